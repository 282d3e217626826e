"""Real-size ChatGLM-6B, ChatGLM2-6B and GLM-4-9B (random weights) through our loader on a GPU: bf16 and NF4.

    python bench/gpu_models.py --workdir /tmp/glmops-gpu --tokenizers DIR [--out results.json]

Builds each model at its published size with random weights, saves it (safetensors), then loads it through
`common.models.loader.load_model` in bf16 and in NF4 (double quant) and times greedy generation with the KV cache.
Prints a table: load time, weights memory, peak memory, ms per generated token. Needs CUDA.

GLM-4-9B comes in its two published shapes: `glm4` is GLM-4-9B-0414 (transformers' Glm4ForCausalLM: two more
RMSNorms per layer), `glm4-chat` is glm-4-9b-chat as our converter writes it (GlmForCausalLM, rotary base
10,000 x 500). Both take GLM-4's tokenizer format (ChatGLM4Tokenizer) over a stand-in vocabulary: the real
`tokenizer.model` is not on the GPU host, and a random-weight model's cost does not depend on which ids it
reads. The stand-in holds the bytes and each common Chinese character of the benchmarks' texts as one token,
as GLM-4's 151,329 tokens do, so prompts have their real token counts.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.models.loader import detect, load_model  # noqa: E402
from common.models.metadata import write_model_metadata  # noqa: E402

CHATGLM2_6B = {"num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
               "multi_query_attention": True, "multi_query_group_num": 2, "ffn_hidden_size": 13696,
               "padded_vocab_size": 65024, "seq_length": 32768, "add_qkv_bias": True, "add_bias_linear": False,
               "layernorm_epsilon": 1e-5, "rmsnorm": True, "post_layer_norm": True, "original_rope": True}


# THUDM/glm-4-9b-chat config.json (size fields); GLM-4-9B-0414's config has the same sizes.
GLM4_9B_CHAT = {"num_layers": 40, "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
                "multi_query_attention": True, "multi_query_group_num": 2, "ffn_hidden_size": 13696,
                "padded_vocab_size": 151552, "seq_length": 131072, "rope_ratio": 500, "add_qkv_bias": True,
                "add_bias_linear": False, "layernorm_epsilon": 1.5625e-07, "rmsnorm": True, "post_layer_norm": True,
                "original_rope": True}
GLM4_FAMILIES = ("glm4", "glm4-chat")
GLM4_TEXT_TOKENS = 151329  # GLM-4's BPE tokens; its special tokens follow


def template_of(family: str) -> str:
    return "glm4" if family in GLM4_FAMILIES else family


def glm4_stand_in_vocabulary(path: Path) -> None:
    """GLM-4's tokenizer format over the bytes plus one token per common Chinese character (see above)."""
    from bench.make_length_mix_data import CHARS
    from common.models.tokenization_glm4 import write_ranks

    ranks = {bytes([b]): b for b in range(256)}
    for ch in CHARS:
        raw = ch.encode("utf-8")
        for end in range(2, len(raw) + 1):
            ranks.setdefault(raw[:end], len(ranks))
    # Fillers no text can reach (no merge makes b"\xff\xfe"), so the special tokens get GLM-4's ids (151,329 on).
    for i in range(len(ranks), GLM4_TEXT_TOKENS):
        ranks[b"\xff\xfe" + i.to_bytes(3, "big")] = i
    write_ranks(ranks, str(path))


def glm4_model(family: str):
    """GLM-4-9B-0414 (Glm4ForCausalLM) or glm-4-9b-chat as converted (GlmForCausalLM), on the default device."""
    from transformers import Glm4Config, Glm4ForCausalLM, GlmForCausalLM

    from common.models.convert_glm import glm_config_from_thudm

    chat = glm_config_from_thudm({**GLM4_9B_CHAT, "eos_token_id": [151329, 151336, 151338],
                                  "pad_token_id": 151329}, "glm4")
    if family == "glm4-chat":
        chat.architectures = ["GlmForCausalLM"]
        return GlmForCausalLM(chat)
    cfg = Glm4Config(**{k: getattr(chat, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "attention_bias", "rms_norm_eps", "pad_token_id", "eos_token_id")},
        max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    cfg.architectures = ["Glm4ForCausalLM"]
    return Glm4ForCausalLM(cfg)


def build(family: str, folder: Path, tokenizers: Path | None, device: str = "cuda") -> int:
    """Random-weight real-size model saved natively; returns the parameter count."""
    from transformers import GlmForCausalLM

    from common.models.convert_glm import glm_config_from_thudm
    from common.models.modeling_chatglm1 import ChatGLM1Config, ChatGLM1ForCausalLM
    from common.models.tokenization_chatglm import ChatGLM1Tokenizer, ChatGLMTokenizer

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        if family == "chatglm":
            cfg = ChatGLM1Config()
            model = ChatGLM1ForCausalLM(cfg)
            tok = ChatGLM1Tokenizer(str(tokenizers / "ice_text.model"))
        elif family in GLM4_FAMILIES:
            from common.models.tokenization_glm4 import ChatGLM4Tokenizer

            model = glm4_model(family)
            folder.mkdir(parents=True, exist_ok=True)
            glm4_stand_in_vocabulary(folder / "stand-in-tokenizer.model")
            tok = ChatGLM4Tokenizer(str(folder / "stand-in-tokenizer.model"))
        else:
            cfg = glm_config_from_thudm(CHATGLM2_6B, "chatglm2")
            cfg.architectures = ["GlmForCausalLM"]
            model = GlmForCausalLM(cfg)
            tok = ChatGLMTokenizer(str(tokenizers / "tokenizer.model"))
    torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if family in GLM4_FAMILIES:
        (folder / "stand-in-tokenizer.model").unlink()  # saved as tokenizer.model
    write_model_metadata(folder, family=template_of(family), template=template_of(family),
                         base_model=f"random/{family}", extra={"note": "random weights, real size"})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return n


def prompt_ids(family: str, n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (n,), generator=g).tolist()
    if family == "chatglm":
        ids = [i + 20000 for i in ids] + [130001, 130004]  # text ids, then [gMASK] <sop>
    elif family in GLM4_FAMILIES:
        ids = [151331, 151333] + ids  # [gMASK] <sop>, then text
        ids = [64790, 64792] + ids  # [gMASK] sop, then text
    return torch.tensor([ids], device="cuda")


def measure(family: str, folder: Path, bits: int, new_tokens: int = 64) -> dict:
    gc.collect()  # models hold reference cycles: free the previous one before measuring
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = load_model(detect(folder), bits=bits, dtype=torch.bfloat16, device="cuda").eval()
    torch.cuda.synchronize()
    load_s = time.time() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    ids = prompt_ids(family)
    kw = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": 0}
    model.generate(ids, **kw)  # warm-up (kernel selection, allocator)
    torch.cuda.synchronize()
    t0 = time.time()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize()
    gen_s = time.time() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    row = {"family": family, "bits": bits, "load_s": round(load_s, 1), "weights_gib": round(weights_gib, 2),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "ms_per_token": round(1000 * gen_s / new_tokens, 1), "new_tokens": new_tokens}
    del model, out
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/glmops-gpu")
    ap.add_argument("--tokenizers", help="folder with ice_text.model and tokenizer.model (ChatGLM-6B, ChatGLM2-6B)")
    ap.add_argument("--families", default="chatglm,chatglm2")
    ap.add_argument("--keep", action="store_true", help="keep the saved models (e.g. for a fine-tune run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for family in args.families.split(","):
        folder = work / family
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.time()
        n = build(family, folder, Path(args.tokenizers) if args.tokenizers else None)
        print(f"{family}: built and saved {n:,} parameters in {time.time() - t0:.0f} s", flush=True)
        for bits in (16, 4):
            row = measure(family, folder, bits)
            row["params"] = n
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print("\n| model | weights | load s | weights GiB | peak GiB | ms/token (batch 1, 64 new) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2-6B", "glm4": "GLM-4-9B-0414",
                "glm4-chat": "glm-4-9b-chat"}[r["family"]]
        print(f"| {name} ({r['params'] / 1e9:.2f} B) | {'bf16' if r['bits'] == 16 else 'NF4'} | {r['load_s']} | "
              f"{r['weights_gib']} | {r['peak_gib']} | {r['ms_per_token']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
