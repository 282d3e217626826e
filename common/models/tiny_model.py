"""A tiny offline ChatGLM2-architecture model for tests and the demo (nothing is downloaded).

`make tiny-model` writes models/tiny-chatglm2: a native transformers `GlmForCausalLM` with the
ChatGLM2 layout (RMSNorm, SwiGLU, grouped-query attention, rotary on half of each head, q/k/v bias,
untied output layer) at toy size, with seeded random weights, and a byte-level BPE tokenizer trained
in-process on data/sample.json. It uses ChatGLM2's special-token names and ids (<unk>=0 pad, </s>=2 eos,
[gMASK], sop), so the `chatglm2` template applies unchanged. Loads with plain `AutoModelForCausalLM` /
`AutoTokenizer`, no `trust_remote_code`.

`--family chatglm3` and `--family glm4` give the same architecture with those families' special tokens
(role tokens; GLM-4's <sop> and <|endoftext|>) and templates, and a tokenizer that has also seen the bundled
tool-call set (data/tools.jsonl) written in that family's tool format, so tests and the demo can train tool use.
`--arch glm4` builds transformers' `Glm4ForCausalLM` instead (GLM-4-0414's layout: RMSNorms also on the
attention's and the MLP's outputs), with GLM-4's tokens unless --family says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.data import answer_text, load_dataset, record_to_conversation
from common.errors import run_cli
from common.models.metadata import write_model_metadata
from common.tools import ToolCall, tool_format

# Ordered so the ids match ChatGLM2's: 0 <unk> (also pad), 2 </s> (eos).
SPECIALS = ["<unk>", "<s>", "</s>", "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# family -> (special tokens, unk, eos, pad)
FAMILIES = {
    "chatglm2": (SPECIALS, "<unk>", "</s>", "<unk>"),
    "chatglm3": (SPECIALS + ROLE_TOKENS, "<unk>", "</s>", "<unk>"),
    "glm4": (["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"] + ROLE_TOKENS,
             "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
}
TOOL_DATA = "data/tools.jsonl"

# The chatglm2 template as Jinja, so plain `tokenizer.apply_chat_template` gives the same ids.
CHAT_TEMPLATE = (
    "[gMASK]sop{% set ns = namespace(i=0) %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set ns.i = ns.i + 1 %}[Round {{ ns.i }}]\n\n问：{{ m['content'] }}\n\n答："
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endif %}"
    "{% endfor %}"
)
# chatglm3 / glm4 plain chat with role tokens (tool calls go through common/templates.py).
ROLE_CHAT_TEMPLATE = ("PREFIX{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _corpus(data_path: str, family: str = "chatglm2") -> list[str]:
    texts = []
    for rec in load_dataset(data_path).records:
        conv = record_to_conversation(rec)
        for q, a in conv.history:
            texts += [q, answer_text(a)]
        texts += [conv.query, answer_text(conv.answer)]
    texts += ["[Round 1]\n\n问：", "\n\n答：", "\n\n"] * 20
    fmt = tool_format(family)
    if fmt is not None and Path(TOOL_DATA).is_file():
        for conv in load_dataset(TOOL_DATA).conversations():
            texts.append(fmt.tools_system(conv.tools))
            for step in (conv.answer if isinstance(conv.answer, list) else []):
                if "call" in step:
                    texts += list(fmt.call_message(ToolCall(**step["call"])))
                texts.append(step.get("observation") or step.get("reply") or "")
            texts.append(conv.query)
    return texts


def build_tokenizer(data_path: str, vocab_size: int = 1024, family: str = "chatglm2"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, unk, eos, pad = FAMILIES[family]
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(data_path, family), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, eos_token=eos, pad_token=pad,
                                 padding_side="left",
                                 additional_special_tokens=[t for t in specials if t not in (unk, eos, pad, "<s>", "</s>")])
    hf.chat_template = CHAT_TEMPLATE if family == "chatglm2" else ROLE_CHAT_TEMPLATE.replace("PREFIX", (
        "[gMASK]sop" if family == "chatglm3" else "[gMASK]<sop>"))
    return hf


ARCHS = ("glm", "glm4")  # transformers' GlmForCausalLM, Glm4ForCausalLM


def build_tiny_model(out_dir: str, data_path: str = "data/sample.json", seed: int = 0,
                     hidden_size: int = 64, num_layers: int = 2, family: str = "chatglm2", arch: str = "glm",
                     attention_init: float | None = None) -> Path:
    """Write the tiny model folder and return its path.

    `attention_init`: the std of the query and key projections' weights instead of the wide init. At the wide
    init each head's attention is nearly one-hot on fixed positions of the prompt, whatever the tokens there,
    and a LoRA cannot turn it towards the question (behind ChatGLM3's 330-token tool list it never learns to
    copy a city into a call). With 0 attention starts from the biases and the rotary positions alone, soft
    over the whole prompt, and the LoRA on q/k learns where to look (bench/tool_calls.py)."""
    import torch
    from transformers import GenerationConfig, Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(data_path, family=family)
    torch.manual_seed(seed)
    config_class, model_class = (Glm4Config, Glm4ForCausalLM) if arch == "glm4" else (GlmConfig, GlmForCausalLM)
    cfg = config_class(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=2048, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5,
        # A wide init (0.02 is usual) lets a LoRA on the frozen random head reach confident predictions,
        # so the demo visibly learns; with 0.02 the largest reachable logit is about 1.3.
        initializer_range=0.25, tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    model = model_class(cfg)
    if attention_init is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.normal_(0.0, attention_init)  # std 0 gives zeros
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               max_new_tokens=64, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_model_metadata(out, family=family, template=family, base_model=f"glmops/tiny-{family}",
                         extra={"note": "random weights; for tests and the demo only", "seed": seed,
                                "tokenizer_trained_on": Path(data_path).name,
                                **({} if attention_init is None else {"attention_init": attention_init})})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output_dir", help="default: models/tiny-FAMILY")
    ap.add_argument("--data_path", default="data/sample.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=sorted(FAMILIES),
                    help="special tokens and template (chatglm3, glm4: role tokens and tool calls); "
                         "default chatglm2, glm4 with --arch glm4")
    ap.add_argument("--arch", default="glm", choices=ARCHS,
                    help="glm: GlmForCausalLM (ChatGLM2/3, glm-4-9b-chat); glm4: Glm4ForCausalLM (GLM-4-0414)")
    ap.add_argument("--attention_init", type=float,
                    help="std of the query/key weights (0: attention starts soft; see build_tiny_model)")
    args = ap.parse_args(argv)
    family = args.family or ("glm4" if args.arch == "glm4" else "chatglm2")
    name = f"tiny-{family}" if args.arch == "glm" else "tiny-glm4-0414"
    out = build_tiny_model(args.output_dir or f"models/{name}", args.data_path, args.seed, family=family,
                           arch=args.arch, attention_init=args.attention_init)
    cfg = json.loads((out / "config.json").read_text())
    print(f"wrote {out} ({cfg['architectures'][0]}, vocab {cfg['vocab_size']}, template {family})")
    return 0


if __name__ == "__main__":
    run_cli(main)
