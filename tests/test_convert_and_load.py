"""`jobs/convert.py` output loads with plain Auto classes; the loader explains broken folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, reference_cases, reference_dir, run_job

from common.errors import ModelFilesError
from common.models.loader import detect, load_model, open_model_folder


@pytest.mark.parametrize("version", ["chatglm1", "chatglm2"])
def test_converted_folder_loads_with_auto_classes_and_generates_the_same(version, tmp_path):
    out = tmp_path / "native"
    proc = run_job("jobs/convert.py", "--base_model", str(reference_dir(version)), "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin")) and not list(out.glob("*.py"))
    single = reference_cases(version)["model_forward"]["singles"][0]
    # A fresh interpreter: plain transformers for ChatGLM2 (native GLM), `import common.models` for ChatGLM-6B.
    code = f"""
import json, torch, sys
{'import common.models' if version == 'chatglm1' else ''}
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
ids = torch.tensor([{single['input_ids']}])
print(json.dumps({{"cls": type(m).__name__, "new": m.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["cls"] == {"chatglm1": "ChatGLM1ForCausalLM", "chatglm2": "GlmForCausalLM"}[version]
    assert got["new"] == single["greedy_new_tokens"]
    json_cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in json_cfg


@pytest.mark.parametrize("version", ["chatglm1", "chatglm2"])
def test_converted_tokenizer_loads_with_autotokenizer_after_import_common(version, tmp_path):
    from transformers import AutoTokenizer

    from common.models.convert import convert_to_native

    out = convert_to_native(detect(reference_dir(version)), tmp_path / "native")
    tok = AutoTokenizer.from_pretrained(out)
    case = reference_cases(version)["tokenize"][2]
    assert tok.encode(case["text"]) == case["ids_with_special"]
    assert detect(out).family == {"chatglm1": "chatglm", "chatglm2": "chatglm2"}[version]


def _copy_reference(version: str, dst, drop: tuple[str, ...] = ()):
    shutil.copytree(reference_dir(version), dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def test_folder_without_weights_lists_what_is_there(tmp_path):
    info = detect(_copy_reference("chatglm2", tmp_path / "m", drop=("model.safetensors",)))
    with pytest.raises(ModelFilesError, match=r"no weights\. Expected model\*\.safetensors.*found \["):
        load_model(info)


def test_unknown_chatglm_config_is_named(tmp_path):
    d = _copy_reference("chatglm2", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["ffn_hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFilesError, match="without ffn_hidden_size.*not a ChatGLM2/3 config we know"):
        load_model(detect(d))


def test_missing_tokenizer_file_is_named(tmp_path):
    from common.models.loader import load_tokenizer

    d = _copy_reference("chatglm1", tmp_path / "m", drop=("ice_text.model",))
    with pytest.raises(ModelFilesError, match="missing ice_text.model"):
        load_tokenizer(detect(d))


def test_weights_that_do_not_fit_the_config_are_explained(tmp_path):
    d = _copy_reference("chatglm2", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFilesError, match="config.json and the weights do not belong together"):
        load_model(detect(d))


def test_not_a_model_folder_and_unknown_path(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelFilesError, match="no config.json"):
        detect(tmp_path)
    with pytest.raises(ModelFilesError, match="no such folder"):
        open_model_folder(str(tmp_path / "missing"))
    with pytest.raises(ModelFilesError, match="not in the local Hugging Face cache"):
        open_model_folder("THUDM/chatglm2-6b", local_files_only=True, cache_dir=str(tmp_path / "hf"))


def test_convert_cli_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    proc = run_job("jobs/convert.py", "--base_model", str(reference_dir("chatglm2")), "--output_dir",
                   str(tmp_path / "out"))
    assert proc.returncode == 2 and "not empty" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("family,expected", [("chatglm", 6_173_286_400), ("chatglm2", 6_243_584_000)])
def test_real_size_configs_give_the_published_parameter_counts(family, expected):
    from transformers import GlmForCausalLM

    from common.models.convert_glm import glm_config_from_thudm
    from common.models.modeling_chatglm1 import ChatGLM1Config, ChatGLM1ForCausalLM

    with torch.device("meta"):
        if family == "chatglm":
            model = ChatGLM1ForCausalLM(ChatGLM1Config())  # defaults are ChatGLM-6B's
        else:
            model = GlmForCausalLM(glm_config_from_thudm(CHATGLM2_6B_CONFIG, "chatglm2"))
    n = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert n == expected


# THUDM/chatglm2-6b config.json (size fields).
CHATGLM2_6B_CONFIG = {
    "num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
    "multi_query_attention": True, "multi_query_group_num": 2, "ffn_hidden_size": 13696,
    "padded_vocab_size": 65024, "seq_length": 32768, "add_qkv_bias": True, "add_bias_linear": False,
    "layernorm_epsilon": 1e-5, "rmsnorm": True, "post_layer_norm": True, "original_rope": True,
}
