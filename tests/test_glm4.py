"""GLM-4-9B in both of its published formats, at toy size.

  glm-4-9b-chat        THUDM's layout (`model_type: chatglm`, ChatGLM2's module names, GLM-4's tiktoken
                       `tokenizer.model`): detected, converted to GlmForCausalLM, tokenized by our ChatGLM4Tokenizer
  Glm4ForCausalLM      transformers' own (GLM-4-0414): loads natively (engine and training: test_engine.py,
                       test_packing.py, test_train_step.py)
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

from common.models.tokenization_glm4 import SPECIALS, write_ranks

# THUDM/glm-4-9b-chat config.json, size fields.
GLM4_9B_CHAT = {"num_layers": 40, "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
                "num_attention_heads": 32, "multi_query_attention": True, "multi_query_group_num": 2,
                "padded_vocab_size": 151552, "seq_length": 131072, "rope_ratio": 500, "add_qkv_bias": True,
                "add_bias_linear": False, "layernorm_epsilon": 1.5625e-07, "rmsnorm": True, "post_layer_norm": True,
                "original_rope": True, "apply_residual_connection_post_layernorm": False}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (what byte-level BPE vocabularies are written in), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def glm4_ranks(tmp_path) -> dict[bytes, int]:
    """BPE ranks in GLM-4's format from the tiny GLM-4 tokenizer's byte-level vocabulary (merge order = rank)."""
    from common.models.tiny_model import build_tokenizer

    hf = build_tokenizer(str(ROOT / "data" / "sample.json"), family="glm4")
    decode = _byte_decoder()
    specials = set(hf.all_special_tokens)
    pieces = sorted((i, t) for t, i in hf.get_vocab().items() if t not in specials)
    return {bytes(decode[c] for c in t): rank for rank, (_, t) in enumerate(pieces)}


def build_thudm_glm4_chat(folder, seed: int = 0):
    """A glm-4-9b-chat folder as THUDM publishes it (config, tiktoken vocabulary, fused QKV weights under
    ChatGLM2's names) at toy size, and the native GlmForCausalLM with the same weights, configured by hand
    as glm-4-9b-chat's arithmetic (rotary base 10,000 x rope_ratio on half of each head, RMSNorm eps 1.5625e-7)."""
    from transformers import GlmConfig, GlmForCausalLM

    folder.mkdir(parents=True)
    ranks = glm4_ranks(folder)
    write_ranks(ranks, str(folder / "tokenizer.model"))
    n = len(ranks)
    vocab = (n + len(SPECIALS) + 63) // 64 * 64  # padded, as THUDM pads 151,343 tokens to 151,552
    eos = [n, n + SPECIALS.index("<|user|>"), n + SPECIALS.index("<|observation|>")]
    cfg = {"model_type": "chatglm", "architectures": ["ChatGLMModel"],
           "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
           **GLM4_9B_CHAT, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "kv_channels": 16,
           "num_attention_heads": 4, "padded_vocab_size": vocab, "seq_length": 1024, "eos_token_id": eos,
           "pad_token_id": n, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLM4Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}, "padding_side": "left"}))
    torch.manual_seed(seed)
    native = GlmForCausalLM(GlmConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=True, rms_norm_eps=1.5625e-07, initializer_range=0.25,
        max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=n, eos_token_id=eos,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * 500, "partial_rotary_factor": 0.5})).eval()
    with torch.no_grad():
        for name, p in native.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    sd = native.state_dict()
    thudm = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
             "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
             "transformer.output_layer.weight": sd["lm_head.weight"],
             "transformer.rotary_pos_emb.inv_freq": torch.zeros(4)}
    for i in range(2):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            thudm[q + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
        thudm[q + "self_attention.dense.weight"] = sd[p + "self_attn.o_proj.weight"]
        thudm[q + "mlp.dense_h_to_4h.weight"] = sd[p + "mlp.gate_up_proj.weight"]
        thudm[q + "mlp.dense_4h_to_h.weight"] = sd[p + "mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            thudm[q + f"{norm}.weight"] = sd[p + f"{norm}.weight"]
    save_file({k: v.contiguous() for k, v in thudm.items()}, str(folder / "model.safetensors"))
    return native


@pytest.fixture(scope="module")
def glm4_chat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("thudm") / "glm-4-9b-chat"
    return folder, build_thudm_glm4_chat(folder)


def test_a_thudm_glm4_chat_folder_is_detected_and_gives_the_native_models_logits(glm4_chat, tmp_path, monkeypatch):
    from common.models.loader import load_model, load_tokenizer, open_model_folder

    monkeypatch.setenv("GLMOPS_CACHE", str(tmp_path / "cache"))
    folder, native = glm4_chat
    info = open_model_folder(str(folder))
    assert (info.layout, info.family, info.template) == ("thudm", "glm4", "glm4")
    model = load_model(info, bits=16, dtype=torch.float32, device="cpu").eval()
    assert type(model).__name__ == "GlmForCausalLM"
    tok = load_tokenizer(info)
    assert type(tok).__name__ == "ChatGLM4Tokenizer"
    from common.data import Conversation
    from common.templates import get_template

    ids = get_template("glm4").encode(tok, Conversation(history=[["你好", "你好！有什么可以帮你？"]], query="北京明天的天气怎么样？",
                                                        answer="晴，最高气温 12 度。")).input_ids
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits
        want = native(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.config.eos_token_id == native.config.eos_token_id


def test_the_glm4_tokenizer_round_trips_text_and_keeps_special_strings_as_text(glm4_chat):
    from common.models.tokenization_glm4 import ChatGLM4Tokenizer

    folder, _ = glm4_chat
    tok = ChatGLM4Tokenizer(str(folder / "tokenizer.model"))
    n = len(tok.ranks)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(n, n + len(SPECIALS)))
    assert tok.eos_token_id == tok.pad_token_id == n
    for text in ["北京明天的天气怎么样？", "Hello, world!\n\n  indented 12345 😀", "混合 text 与 数字 2024 年"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert all(i < n for i in ids) and tok.decode(ids) == text
    assert tok.encode("你好")[:2] == [tok.get_command("[gMASK]"), tok.get_command("<sop>")]
    typed = tok.encode("<|user|>", add_special_tokens=False)  # a user typing a role token gets text, not the role
    assert tok.get_command("<|user|>") not in typed and tok.decode(typed) == "<|user|>"
    # a character split over two tokens decodes whole once both are there
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and tok.decode(ids) == "😀"


def test_a_vocabulary_file_of_another_kind_is_named(tmp_path):
    from common.errors import ModelFilesError
    from common.models.tokenization_glm4 import ChatGLM4Tokenizer

    bad = tmp_path / "tokenizer.model"
    bad.write_text("aGVsbG8= 0\nthis is not a rank line\n")
    with pytest.raises(ModelFilesError, match="line 2"):
        ChatGLM4Tokenizer(str(bad))


def test_glm4_9b_chat_and_glm4_0414_real_size_configs_give_their_published_parameter_counts():
    from transformers import Glm4Config, Glm4ForCausalLM, GlmForCausalLM

    from common.models.convert_glm import glm_config_from_thudm

    with torch.device("meta"):
        chat = GlmForCausalLM(glm_config_from_thudm(GLM4_9B_CHAT, "glm4"))
        v0414 = Glm4ForCausalLM(Glm4Config(
            vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
            num_attention_heads=32, num_key_value_heads=2, head_dim=128, attention_bias=True,
            partial_rotary_factor=0.5, tie_word_embeddings=False))
    n_chat = sum(p.numel() for p in chat.parameters())
    n_0414 = sum(p.numel() for p in v0414.parameters())
    assert round(n_chat / 1e8) == 94  # "9.4B params" on both model cards
    assert n_0414 - n_chat == 40 * 2 * 4096  # GLM-4-0414 adds two norms per layer, nothing else
    assert chat.config.rope_parameters["rope_theta"] == 5_000_000.0
