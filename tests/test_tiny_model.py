"""The offline default model: plain transformers loads it, no remote code, and it generates."""

from __future__ import annotations

import json

import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer, GlmForCausalLM

from common.data import Conversation
from common.models.loader import detect, load_tokenizer
from common.templates import get_template


def test_tiny_model_is_a_native_glm_with_chatglm2_layout(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["model_type"] == "glm" and cfg["architectures"] == ["GlmForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and cfg["attention_bias"] is True
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.5 and cfg["tie_word_embeddings"] is False
    assert (tiny_model / "model.safetensors").is_file()
    assert not list(tiny_model.glob("*.py")) and not list(tiny_model.glob("*.bin"))


def test_loads_with_auto_classes_and_generates(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert isinstance(model, GlmForCausalLM)
    ids = get_template("chatglm2").prompt(tok, Conversation(history=[], query="你好"))
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(ids)


def test_the_folder_describes_its_family_and_template(tiny_model):
    info = detect(tiny_model)
    assert (info.layout, info.family, info.template) == ("native", "chatglm2", "chatglm2")
    tok = load_tokenizer(info)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)


def test_building_twice_gives_identical_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from common.models.tiny_model import build_tiny_model

    again = build_tiny_model(str(tmp_path / "again"), str(ROOT / "data/sample.json"))
    a, b = load_file(tiny_model / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_attention_init_sets_only_the_query_and_key_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from common.models.tiny_model import build_tiny_model

    soft = build_tiny_model(str(tmp_path / "soft"), str(ROOT / "data/sample.json"), attention_init=0.0)
    a, b = load_file(tiny_model / "model.safetensors"), load_file(soft / "model.safetensors")
    qk = [k for k in b if k.endswith(("q_proj.weight", "k_proj.weight"))]
    assert len(qk) == 2 * json.loads((soft / "config.json").read_text())["num_hidden_layers"]
    assert all(not b[k].any() for k in qk)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in qk)
    assert json.loads((soft / "glmops.json").read_text())["attention_init"] == 0.0
