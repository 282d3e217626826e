"""Serve's controller, proxy and HTTP front end import only what they run: no torch, no transformers (each
would cost ~4 s of start-up and a few hundred MB per process)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

FRONT_END = ["serving", "serving.api", "serving.draining", "serving.slow_clients", "serving.web", "serving.events",
             "common.config", "common.chat_records", "common.tools"]


def test_the_front_end_modules_import_neither_torch_nor_transformers():
    code = f"import sys\nfor m in {FRONT_END!r}: __import__(m)\nprint(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_importing_common_models_registers_chatglm_6b_with_the_auto_classes():
    code = ("import common.models\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            "print(AutoModelForCausalLM.from_config(AutoConfig.for_model('chatglm1', num_layers=1, hidden_size=64, "
            "num_attention_heads=4, inner_hidden_size=128, vocab_size=1000, max_sequence_length=64)).__class__.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ChatGLM1ForCausalLM"
