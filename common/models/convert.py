"""THUDM ChatGLM folders → native checkpoints that plain transformers (and other engines) load.

  ChatGLM2/3, glm-4-9b-chat → `GlmForCausalLM` (transformers' own class; no glmops code needed to load it)
  ChatGLM-6B → our `ChatGLM1ForCausalLM` (`model_type: chatglm1`; load after `import common.models`)
Weights go to safetensors shards; tokenizer files, generation config and glmops.json come along.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from common.errors import ModelFilesError
from common.models.convert_glm import (
    chatglm1_config_from_thudm,
    iter_checkpoint,
    load_thudm_v2_config,
    map_v2_tensors,
)
from common.models.folders import ModelInfo, load_tokenizer
from common.models.metadata import write_model_metadata

SHARD_BYTES = 2 * 1024**3


def _dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _save_sharded(tensors, out: Path) -> None:
    """Stream (name, tensor) pairs into safetensors shards with an index (bounded memory)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if size and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _route_autotokenizer_to_ours(out: Path, cls: str) -> None:
    """Make AutoTokenizer pick our exact tokenizer (ChatGLMTokenizer, ChatGLM4Tokenizer) for a native GLM folder.

    For `model_type: glm` transformers would otherwise build an approximate fast tokenizer from
    tokenizer.model. With an auto_map entry, AutoTokenizer uses the class registered by `import common.models`;
    without that import it stops with an error instead of silently tokenizing differently. The
    entry names no file: nothing is ever downloaded or executed from the folder."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoTokenizer": [f"tokenization_chatglm.{cls}", None]}
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_to_native(info: ModelInfo, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a native copy of a THUDM-layout folder; returns the output folder."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(info)
    if info.family == "chatglm":
        from common.models.modeling_chatglm1 import ChatGLM1ForCausalLM

        cfg = chatglm1_config_from_thudm(info.path)
        model = ChatGLM1ForCausalLM.from_pretrained(info.path, config=cfg, dtype=dtype or torch.float16)
        model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        model.save_pretrained(out)
    elif info.family in ("chatglm2", "chatglm3", "glm4"):
        cfg = load_thudm_v2_config(info.path, info.family)
        q_rows = cfg.num_attention_heads * cfg.head_dim
        kv_rows = cfg.num_key_value_heads * cfg.head_dim
        first_dtype: list[torch.dtype] = []

        def tensors():
            for name, t in iter_checkpoint(info.path):
                for new_name, new_t in map_v2_tensors(name, t, q_rows, kv_rows):
                    new_t = new_t.to(dtype) if dtype is not None else new_t
                    first_dtype[:] = first_dtype or [new_t.dtype]
                    yield new_name, new_t

        _save_sharded(tensors(), out)
        cfg.architectures = ["GlmForCausalLM"]
        cfg.dtype = _dtype_name(first_dtype[0]) if first_dtype else "float32"
        cfg.save_pretrained(out)
        GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id).save_pretrained(out)
    else:
        raise ModelFilesError(f"{info.path}: already in a native layout ({info.family}); nothing to convert.")
    tok.save_pretrained(out)
    if info.family in ("chatglm2", "chatglm3", "glm4"):
        _route_autotokenizer_to_ours(out, type(tok).__name__)
    write_model_metadata(out, family=info.family, template=info.template, base_model=info.name,
                         revision=info.revision, extra={"converted_from": "thudm"})
    for extra in ("README.md", "LICENSE", "MODEL_LICENSE"):
        if (info.path / extra).is_file():
            shutil.copyfile(info.path / extra, out / extra)
    return out
