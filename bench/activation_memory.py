"""What one decoder layer keeps for backward, per token: the tensors behind the memory plan's estimate.

    python bench/activation_memory.py --out bench/results/activation_memory.json

Builds one ChatGLM2-6B decoder layer at its real width (hidden 4096, SwiGLU 13696, 2 key/value groups) with
4-bit NF4 linears and LoRA on them, runs it forward as the worker does (bf16 autocast, fp32 LoRA weights) under
saved-tensor hooks, and counts the bytes of every tensor kept for backward at two row lengths: the difference
divided by the extra tokens is what a token costs, free of the weights and of anything per layer. Eager and
compiled (inductor), LoRA on q/k/v (the benchmark's) and on all six linears (the job's), LoRA's dropout kept
or recomputed (`common.training.compiling.recompute_lora_dropout`). Runs on CPU (inductor's C++ backend;
the GPU keeps 4 x hidden bytes more per token: bench/NOTES.md), about a minute per compiled row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

QKV = ("q_proj", "k_proj", "v_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
ROWS = [  # (name, LoRA modules, dropout, compiled, dropout recomputed)
    ("eager, LoRA q/k/v", QKV, 0.05, False, False),
    ("compiled, LoRA q/k/v, dropout kept", QKV, 0.05, True, False),
    ("compiled, LoRA q/k/v, dropout recomputed", QKV, 0.05, True, True),
    ("compiled, job's LoRA, dropout kept", ALL, 0.1, True, False),
    ("compiled, job's LoRA, dropout recomputed", ALL, 0.1, True, True),
]
GLM1_QKV, GLM1_ALL = ("query_key_value",), ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ROWS_CHATGLM1 = [  # ChatGLM-6B's layer, compiled as on a GPU (FlexAttention over a packed row's block mask)
    ("compiled, LoRA qkv, dropout kept", GLM1_QKV, 0.05, True, False),
    ("compiled, LoRA qkv, dropout recomputed", GLM1_QKV, 0.05, True, True),
    ("compiled, job's LoRA, dropout recomputed", GLM1_ALL, 0.1, True, True),
]


def one_layer(targets, dropout: float):
    """A one-layer ChatGLM2-6B-wide GLM with NF4 linears and peft LoRA; returns (layer, rotary module)."""
    from transformers import GlmForCausalLM

    from bench.gpu_models import CHATGLM2_6B
    from common.models.convert_glm import glm_config_from_thudm

    torch.manual_seed(0)
    cfg = glm_config_from_thudm({**CHATGLM2_6B, "num_layers": 1, "padded_vocab_size": 256}, "chatglm2")
    model = GlmForCausalLM(cfg).to(torch.bfloat16)
    layer = model.model.layers[0]
    model = _nf4_with_lora(model, (layer.self_attn, layer.mlp), targets, dropout)
    inner = model.base_model.model.model
    return model, inner.layers[0], inner.rotary_emb


def one_chatglm1_layer(targets, dropout: float):
    """A one-layer ChatGLM-6B (hidden 4096, GELU 16384, 32 key/value heads) with NF4 linears and peft LoRA."""
    from common.models.modeling_chatglm1 import ChatGLM1Config, ChatGLM1ForCausalLM

    torch.manual_seed(0)
    model = ChatGLM1ForCausalLM(ChatGLM1Config(num_layers=1, vocab_size=256)).to(torch.bfloat16)
    layer = model.transformer.layers[0]
    model = _nf4_with_lora(model, (layer.attention, layer.mlp), targets, dropout)
    return model, model.base_model.model.transformer.layers[0], None


def _nf4_with_lora(model, parents, targets, dropout: float):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    for parent in parents:
        for name, lin in list(parent.named_children()):
            if isinstance(lin, torch.nn.Linear):
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                q.support_avx512bf16_for_cpu = False
                setattr(parent, name, q.to("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules=list(targets)))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as the worker keeps them
    return model


def kept_bytes(model, layer, rotary, tokens: int) -> int:
    """Bytes of the distinct tensors the layer keeps for backward over `tokens` tokens (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in weights:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, 4096, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        if rotary is None:  # ChatGLM-6B: one packed example, half prompt, its attention as on a GPU (see below)
            from common.models.modeling_chatglm1 import example_positions
            from common.models.prefix_mask import block_mask

            ids = [5] * (tokens // 2 - 2) + [130001, 130004] + [5] * (tokens - tokens // 2)
            pos, prompt = example_positions(ids, model.base_model.model.config)
            mask = block_mask(torch.tensor([0, tokens]), torch.tensor([prompt]), tokens)
            out = layer(x, position_ids=torch.from_numpy(pos)[None], mask=mask)
        else:
            pos = torch.arange(tokens)[None]
            out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rotary(x, pos))
    del out
    return total


def _sdpa_for_flex(q, k, v, block_mask=None, scale=None):
    """FlexAttention has no backward on CPU: SDPA (no mask) stands in for it. Both keep q, k, v, the output and
    the log-sum-exp for backward, so the bytes counted are those of the GPU's FlexAttention."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def measure(targets, dropout: float, compiled: bool, recompute: bool, family: str = "chatglm2") -> dict:
    from common.training.compiling import compile_layers, recompute_lora_dropout
    from common.training.memory import LayerActivations, model_dims

    torch._dynamo.reset()
    if family == "chatglm":
        from common.models import modeling_chatglm1

        modeling_chatglm1._flex_attention = lambda: _sdpa_for_flex
    model, layer, rotary = (one_chatglm1_layer if family == "chatglm" else one_layer)(targets, dropout)
    model.train()
    if recompute:
        recompute_lora_dropout(model)
    if compiled:
        compile_layers(model, dynamic=True)
    short, long = 128, 256
    kept_bytes(model, layer, rotary, long)  # compiles (and warms) the graph
    per_token = (kept_bytes(model, layer, rotary, long) - kept_bytes(model, layer, rotary, short)) / (long - short)
    config = model.base_model.model.config
    _, hidden, inter = model_dims(config)
    estimate = LayerActivations(tuple(targets), dropout, compiled, recompute).bytes_per_token(config)
    gpu_extra = 4 * hidden if compiled else 0
    return {"bytes_per_token": round(per_token), "bytes_per_unit": round(per_token / (hidden + inter), 2),
            "estimate_without_gpu_extra": round(estimate - gpu_extra)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help="comma-separated words: only the rows whose name contains one")
    ap.add_argument("--family", default="chatglm2", choices=["chatglm2", "chatglm"],
                    help="the layer measured: ChatGLM2-6B's or ChatGLM-6B's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    words = [w.strip() for w in args.rows.split(",") if w.strip()]
    rows = []
    print("| layer | bytes per token | per (hidden + intermediate) | the plan's estimate (CPU part) |")
    print("|---|---|---|---|")
    for name, targets, dropout, compiled, recompute in ROWS_CHATGLM1 if args.family == "chatglm" else ROWS:
        if words and not any(w in name for w in words):
            continue
        r = {"name": name, **measure(targets, dropout, compiled, recompute, args.family)}
        rows.append(r)
        print(f"| {name} | {r['bytes_per_token']:,} | {r['bytes_per_unit']} | {r['estimate_without_gpu_extra']:,} |",
              flush=True)
    if args.out:
        import transformers

        Path(args.out).write_text(json.dumps({
            "command": "python bench/activation_memory.py " + " ".join(
                "OUT.json" if a == args.out else a for a in sys.argv[1:]),
            "family": args.family, "device": "cpu", "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
