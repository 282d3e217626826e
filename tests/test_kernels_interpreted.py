"""The serving engine's Triton kernels, run by Triton's interpreter on CPU against the PyTorch reference: their
logic is checked on every CI run, not only where a GPU is (tests/test_kernels.py checks them compiled there).

The interpreter is chosen when Triton is imported (TRITON_INTERPRET=1), so the checks run in a child process.
float32 only: the interpreter's bfloat16 `tl.dot` is not exact (the compiled kernels are checked in bfloat16 at
each GPU start-up and in tests/test_kernels.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

CHECKS = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    from serving.kernels import TorchOps, TritonOps, check_ops
    from common.models.modeling_chatglm1 import ChatGLM1Config, ChatGLM1ForCausalLM
    from serving.kernels_chatglm1 import TorchOps1, TritonOps1, check_ops1
    from serving.kernels_gemv import GEMV_MAX_ROWS, check_gemv
    from serving.kernels_lora import check_gathered
    from serving.runners import ChatGLM1Runner, GlmRunner, RowInput

    cpu, f32 = torch.device("cpu"), torch.float32
    found = {
        "decode ops": check_ops(TritonOps, heads=4, kv_heads=2, head_dim=16, rot=8, hidden=64, ffn=128, dtype=f32,
                                device=cpu),
        "chatglm1 ops": check_ops1(TritonOps1, heads=4, head_dim=16, hidden=64, ffn=256, dtype=f32, device=cpu),
        "gathered lora": check_gathered(cpu, f32, hidden=64, rank=8, slots=2, widths=(64, 32, 32)),
        # widths and depths that are no multiple of the kernel's blocks, with and without bias and SwiGLU
        "gemv": check_gemv(cpu, f32, {"qkv": (48, 64, True, False), "o": (40, 100, False, False),
                                      "down": (64, 96, False, True)}, splits=(1, 3)),
    }

    # The runner's logits with `reference` ops and every projection through F.linear, then with `kernels` and
    # every projection through the GEMV: the same prompts, then decode steps of 1 to 4 rows.
    # `split`: the parts of K every GEMV runs in; `fuse`: SwiGLU inside the down GEMV or before it.
    def both_ways(runner, prompts, reference: dict, kernels: dict, split: int = 1, fuse: bool = True) -> str | None:
        steps = []
        runner.proj.split, runner.proj.fuse = dict.fromkeys(runner.proj.weights, split), fuse
        for ops, fast in ((reference, set()), (kernels, set(runner.proj.weights))):
            for name, value in ops.items():
                setattr(runner, name, value)
            runner.proj.fast = fast
            logits = [runner.forward(prompts)]
            for rows in range(1, GEMV_MAX_ROWS + 1):
                runner.last_token[:rows] = torch.arange(rows) + 40
                logits.append(runner.forward([RowInput(s, None, r.size + s) for s, r in enumerate(prompts[:rows])]))
            steps.append(logits)
        worst = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(*steps))
        return None if worst < 1e-4 else f"logits differ by {worst:.3g} (relative)"

    def random_biases(model):  # a fresh model's biases are zeros: a kernel that dropped them would pass
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
        return model

    model = random_biases(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=f32).eval())
    runner = GlmRunner(model, 5, 64, cuda_graphs=False)
    prompts = [RowInput(s, [5 + s, 9, 12, 7 + s, 30, 2, 11][: 3 + s], 0) for s in range(4)]
    found["glm step"] = both_ways(runner, prompts, {"ops": TorchOps}, {"ops": TritonOps})
    found["glm step, K in 2 parts, SwiGLU apart"] = both_ways(runner, prompts, {"ops": TorchOps}, {"ops": TritonOps},
                                                              split=2, fuse=False)
    found["glm projections"] = sorted(runner.proj.weights)

    torch.manual_seed(0)
    glm1 = random_biases(ChatGLM1ForCausalLM(ChatGLM1Config(hidden_size=64, num_layers=2, num_attention_heads=4,
                                                            inner_hidden_size=128, vocab_size=130528)).eval())
    runner = ChatGLM1Runner(glm1, 5, 64, cuda_graphs=False)
    prompts = [RowInput(s, [5 + s, 9, 12, 7 + s, 30][: 2 + s] + [130001, 130004], 0) for s in range(4)]
    found["chatglm1 step"] = both_ways(runner, prompts, {"ops": TorchOps1, "attend": TorchOps},
                                       {"ops": TritonOps1, "attend": TritonOps})
    found["chatglm1 projections"] = sorted(runner.proj.weights)
    print("CHECKS " + json.dumps(found))
""")


@pytest.fixture(scope="module")
def checks(tiny_model) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHECKS, str(tiny_model)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("CHECKS "))
    return json.loads(line.removeprefix("CHECKS "))


@pytest.mark.parametrize("kernels", ["decode ops", "chatglm1 ops", "gathered lora", "gemv"])
def test_each_triton_kernel_agrees_with_its_reference(checks, kernels):
    assert checks[kernels] is None, checks[kernels]


def test_a_step_through_every_kernel_gives_the_reference_logits_at_one_to_four_rows(checks):
    """Prompts and decode steps of 1-4 rows through each runner, every kernel on (all projections through the GEMV at
    up to four rows; GLM's SwiGLU inside its down projection): the logits are the reference path's."""
    assert checks["glm projections"] == ["down", "gate_up", "head", "o", "qkv"]
    assert checks["glm step"] is None, checks["glm step"]
    # the other ways the start-up timing may choose: K in parts (summed by a second kernel), SwiGLU before the GEMV
    assert checks["glm step, K in 2 parts, SwiGLU apart"] is None, checks["glm step, K in 2 parts, SwiGLU apart"]
    assert checks["chatglm1 projections"] == ["4h_to_h", "dense", "h_to_4h", "head", "qkv"]
    assert checks["chatglm1 step"] is None, checks["chatglm1 step"]
