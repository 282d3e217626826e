"""ChatGLM2-6B / ChatGLM3-6B checkpoints in THUDM's layout → transformers' native `GlmForCausalLM`.

The architectures are the same; only names and the fused q/k/v layout differ:
  transformer.embedding.word_embeddings      → model.embed_tokens
  …layers.i.self_attention.query_key_value   → q_proj / k_proj / v_proj (rows [H·D | G·D | G·D])
  …layers.i.self_attention.dense             → self_attn.o_proj
  …layers.i.mlp.dense_h_to_4h                → mlp.gate_up_proj (gate half first, unchanged)
  …layers.i.mlp.dense_4h_to_h                → mlp.down_proj
  transformer.encoder.final_layernorm        → model.norm
  transformer.output_layer                   → lm_head
  transformer.rotary_pos_emb.inv_freq        → dropped (recomputed)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from common.errors import ModelFilesError

REQUIRED_V2_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size")


def glm_config_from_thudm(cfg: dict, family: str, source: str = "config.json"):
    """A native GlmConfig equal in computation to a THUDM ChatGLM2/3 config."""
    from transformers import GlmConfig

    missing = [k for k in REQUIRED_V2_KEYS if k not in cfg]
    if missing:
        raise ModelFilesError(
            f"{source}: a ChatGLM config without {', '.join(missing)}; this is not a ChatGLM2/3 config we know "
            "(ChatGLM-6B configs have position_encoding_2d; GLM-4 `-hf` folders load natively)."
        )
    unsupported = {k: cfg[k] for k in ("rmsnorm", "post_layer_norm", "original_rope") if cfg.get(k) is False}
    if cfg.get("add_bias_linear"):
        unsupported["add_bias_linear"] = True
    if cfg.get("apply_residual_connection_post_layernorm"):
        unsupported["apply_residual_connection_post_layernorm"] = True
    if unsupported:
        raise ModelFilesError(f"{source}: unsupported ChatGLM variant ({unsupported}); no native equivalent.")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("kv_channels", cfg["hidden_size"] // heads)
    groups = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention", False) else heads
    theta = 10000.0 * float(cfg.get("rope_ratio", 1.0))
    eos = cfg.get("eos_token_id", 2)
    if family == "chatglm3":
        eos = [2, 64795, 64797]  # </s>, <|user|>, <|observation|>: the chat model's turn ends
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"], num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim, hidden_act="silu",
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5), attention_bias=bool(cfg.get("add_qkv_bias", True)),
        max_position_embeddings=cfg.get("seq_length", 32768), tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5},
        pad_token_id=cfg.get("pad_token_id", 0), eos_token_id=eos, bos_token_id=None,
    )


_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")


def map_v2_tensors(name: str, t: torch.Tensor, q_rows: int, kv_rows: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Native (name, tensor) pairs for one THUDM ChatGLM2/3 tensor."""
    if name.endswith("rotary_pos_emb.inv_freq"):
        return
    if name == "transformer.embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", t
    elif name == "transformer.encoder.final_layernorm.weight":
        yield "model.norm.weight", t
    elif name == "transformer.output_layer.weight":
        yield "lm_head.weight", t
    elif m := _LAYER.match(name):
        i, rest = m.groups()
        p = f"model.layers.{i}."
        if rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]
            if t.shape[0] != q_rows + 2 * kv_rows:
                raise ModelFilesError(
                    f"{name}: {t.shape[0]} rows, but the config implies {q_rows} query + 2 x {kv_rows} key/value "
                    "rows; config.json and the weights do not belong together."
                )
            q, k, v = torch.split(t, [q_rows, kv_rows, kv_rows], dim=0)
            yield p + f"self_attn.q_proj.{kind}", q
            yield p + f"self_attn.k_proj.{kind}", k
            yield p + f"self_attn.v_proj.{kind}", v
        elif rest == "self_attention.dense.weight":
            yield p + "self_attn.o_proj.weight", t
        elif rest == "mlp.dense_h_to_4h.weight":
            yield p + "mlp.gate_up_proj.weight", t
        elif rest == "mlp.dense_4h_to_h.weight":
            yield p + "mlp.down_proj.weight", t
        elif rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            yield p + rest, t
        else:
            raise ModelFilesError(f"unexpected tensor {name} in a ChatGLM2/3 checkpoint")
    else:
        raise ModelFilesError(f"unexpected tensor {name} in a ChatGLM2/3 checkpoint")


def weight_files(folder: Path) -> list[Path]:
    """Weight shards of a folder, safetensors preferred; a clear message when there are none."""
    for pattern in ("*.safetensors", "pytorch_model*.bin", "model*.bin"):
        files = sorted(p for p in folder.glob(pattern) if p.name != "hidden_states.safetensors")
        if files:
            return files
    present = sorted(p.name for p in folder.iterdir())[:20]
    raise ModelFilesError(
        f"{folder}: no weights. Expected model*.safetensors or pytorch_model-*.bin shards next to config.json; "
        f"found {present}."
    )


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every shard; .bin files are read with weights_only=True (no pickled code)."""
    from safetensors import safe_open

    for f in weight_files(folder):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def native_state_dict(folder: Path, config) -> dict[str, torch.Tensor]:
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in iter_checkpoint(folder):
        for new_name, new_t in map_v2_tensors(name, t, q_rows, kv_rows):
            out[new_name] = new_t.contiguous()
    return out


def load_thudm_v2_config(folder: Path, family: str):
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return glm_config_from_thudm(cfg, family, str(folder / "config.json"))


def chatglm1_config_from_thudm(folder: Path):
    from common.models.modeling_chatglm1 import ChatGLM1Config

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    keep = {k: v for k, v in cfg.items() if k not in ("auto_map", "architectures", "model_type",
                                                       "transformers_version", "torch_dtype", "_name_or_path")}
    for k in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size"):
        if k not in keep:
            raise ModelFilesError(f"{folder / 'config.json'}: a ChatGLM-6B config without {k!r}.")
    if keep.get("inner_hidden_size") is None:
        keep["inner_hidden_size"] = 4 * keep["hidden_size"]
    return ChatGLM1Config(**keep)
