"""Which model a `--base_model` names: a local folder or a Hugging Face id (read from the local cache when
offline or with `--local_files_only`), its layout and family, and its tokenizer.

Folders come in two layouts, detected automatically:
  native  transformers' own format (GlmForCausalLM, GLM-4 `-hf`, our tiny model, converted ChatGLMs)
  thudm   THUDM's original repos (config `model_type: chatglm`, remote-code files we never execute): ChatGLM-6B,
          ChatGLM2/3-6B and glm-4-9b-chat (told apart by their tokenizer files)
The family (chatglm, chatglm2, chatglm3, glm4, other) decides the chat template. Both the converter and the
loader stand on this module; it imports neither.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import ModelFilesError
from common.models.metadata import read_model_metadata

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


@dataclass
class ModelInfo:
    path: Path            # local folder
    name: str             # what the user gave (id or path)
    layout: str           # "native" or "thudm"
    family: str           # chatglm | chatglm2 | chatglm3 | glm4 | other
    template: str         # chat template name
    revision: str | None = None


def resolve(base_model: str, *, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False) -> Path:
    """A local folder for `base_model`, from disk or the Hugging Face cache (downloaded only if allowed)."""
    p = Path(base_model).expanduser()
    if p.is_dir():
        return p
    # "org/name" is a hub id unless "org" is a local folder (models/tiny-chatglm2 before `make tiny-model`).
    looks_like_path = (base_model.startswith((".", "/", "~")) or base_model.count("/") != 1
                       or p.parent.is_dir() or p.parts[0] in ("models", "output"))
    if looks_like_path:
        hint = " Run `make tiny-model` to create it." if "tiny-chatglm2" in base_model else ""
        raise ModelFilesError(
            f"base model {base_model!r}: no such folder.{hint} Pass a local model folder or a Hugging Face id "
            "such as THUDM/chatglm2-6b."
        )
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base_model, revision=revision, cache_dir=cache_dir, local_files_only=offline))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; the user needs the gist
        how = ("it is not in the local Hugging Face cache" if offline
               else f"it could not be downloaded ({type(err).__name__})")
        raise ModelFilesError(
            f"base model {base_model!r}: {how}. Download it on a machine with network "
            f"(`huggingface-cli download {base_model}`) and copy the cache, or pass a local folder."
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFilesError(f"{path}: cannot read it as JSON ({err}).") from None


def detect(folder: Path, name: str | None = None) -> ModelInfo:
    """Layout and family of a model folder; a clear message when the folder is not a model."""
    name = name or str(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise ModelFilesError(
            f"{folder}: no config.json, so this is not a model folder. Found: {present or 'nothing'}. "
            "Expected config.json, tokenizer files and weights (*.safetensors or pytorch_model*.bin)."
        )
    cfg = _read_json(cfg_path)
    meta = read_model_metadata(folder) or {}
    model_type = cfg.get("model_type", "")
    if model_type == "chatglm":
        layout = "thudm"
        if cfg.get("position_encoding_2d") or (folder / "ice_text.model").is_file():
            family = "chatglm"
        elif _is_bpe_ranks(folder / "tokenizer.model"):
            family = "glm4"  # glm-4-9b-chat: ChatGLM2's model code and layout, GLM-4's tokenizer
        else:
            family = _v2_or_v3(folder, name)
    else:
        layout = "native"
        family = meta.get("family") or {"glm": "chatglm2", "glm4": "glm4", "chatglm1": "chatglm"}.get(model_type, "other")
    template = meta.get("template") or (family if family != "other" else "hf")
    return ModelInfo(path=folder, name=name, layout=layout, family=family, template=template,
                     revision=meta.get("revision"))


def _is_bpe_ranks(path: Path) -> bool:
    """GLM-4's tokenizer.model is text ("base64-token rank" lines); ChatGLM2/3's is a binary sentencepiece model."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n")[0].split()
    return len(head) == 2 and head[1].isdigit() and all(c in _BASE64 for c in head[0])


_BASE64 = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def _v2_or_v3(folder: Path, name: str) -> str:
    """ChatGLM2 and ChatGLM3 share config and vocabulary; ChatGLM3 adds role tokens.

    Read (never run) the repo's tokenizer code, then the recorded name, then the folder name."""
    code = folder / "tokenization_chatglm.py"
    if code.is_file():
        return "chatglm3" if "<|observation|>" in code.read_text(encoding="utf-8", errors="replace") else "chatglm2"
    tcfg = folder / "tokenizer_config.json"
    hints = [name, folder.name]
    if tcfg.is_file():
        hints.append(str(_read_json(tcfg).get("name_or_path", "")))
    return "chatglm3" if any("chatglm3" in h.lower() for h in hints) else "chatglm2"


def load_tokenizer(info: ModelInfo, trust_remote_code: bool = False):
    """The tokenizer for a detected folder: ours for THUDM layouts, transformers' otherwise."""
    if info.layout == "thudm":
        from common.models.tokenization_chatglm import ChatGLM1Tokenizer, ChatGLMTokenizer

        if info.family == "chatglm":
            vocab = info.path / "ice_text.model"
            _require(vocab, info.path, "ChatGLM-6B's sentencepiece model")
            return ChatGLM1Tokenizer(str(vocab))
        if info.family == "glm4":
            from common.models.tokenization_glm4 import ChatGLM4Tokenizer

            return ChatGLM4Tokenizer(str(info.path / "tokenizer.model"))
        vocab = info.path / "tokenizer.model"
        _require(vocab, info.path, "ChatGLM2/3's sentencepiece model")
        return ChatGLMTokenizer(str(vocab), chat_roles=info.family == "chatglm3")
    from transformers import AutoTokenizer

    tcfg_path = info.path / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else {}
    if tcfg.get("tokenizer_class") in ("ChatGLMTokenizer", "ChatGLM1Tokenizer", "ChatGLM4Tokenizer"):
        # Our exact tokenizers, whatever AutoTokenizer would pick for the model type.
        from common.models.tokenization_chatglm import ChatGLM1Tokenizer, ChatGLMTokenizer
        from common.models.tokenization_glm4 import ChatGLM4Tokenizer

        cls = {"ChatGLM1Tokenizer": ChatGLM1Tokenizer, "ChatGLM4Tokenizer": ChatGLM4Tokenizer}.get(
            tcfg["tokenizer_class"], ChatGLMTokenizer)
        vocab = info.path / next(iter(cls.vocab_files_names.values()))
        _require(vocab, info.path, "the tokenizer's vocabulary file")
        return cls.from_pretrained(info.path)
    try:
        return AutoTokenizer.from_pretrained(info.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelFilesError(f"{info.path}: cannot load the tokenizer: {err}") from None


def _require(path: Path, folder: Path, what: str) -> None:
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise ModelFilesError(f"{folder}: missing {path.name} ({what}). Found: {present}.")


def open_model_folder(base_model: str, *, revision: str | None = None, cache_dir: str | None = None,
                      local_files_only: bool = False) -> ModelInfo:
    folder = resolve(base_model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    info = detect(folder, base_model)
    info.revision = info.revision or revision
    return info
