"""The decode step's small ops: the Triton kernels agree with the PyTorch reference (GPU), and the
reference is what transformers' GLM layer computes (everywhere)."""

from __future__ import annotations

import pytest
import torch

from serving.kernels import TorchOps, check_ops, triton

CHATGLM2_SHAPES = dict(heads=32, kv_heads=2, head_dim=128, rot=64, hidden=4096, ffn=13696)
TINY_SHAPES = dict(heads=4, kv_heads=2, head_dim=16, rot=8, hidden=64, ffn=128)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="Triton kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shapes", [CHATGLM2_SHAPES, TINY_SHAPES], ids=["chatglm2-6b", "tiny"])
def test_triton_decode_ops_agree_with_the_reference(dtype, shapes):
    from serving.kernels import TritonOps

    assert check_ops(TritonOps, dtype=dtype, device=torch.device("cuda"), **shapes) is None


def test_the_reference_ops_are_the_glm_layer_arithmetic(tiny_model):
    """One decode token through TorchOps equals the GLM layer's own attention and MLP on that token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    layer, cfg = model.model.layers[0], model.config
    torch.manual_seed(0)
    x = torch.randn(1, 5, cfg.hidden_size)
    positions = torch.arange(5)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    with torch.no_grad():
        want = layer(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
        want = want[0] if isinstance(want, tuple) else want
        # The same five tokens, one at a time through the reference ops over a cache.
        d = cfg.head_dim
        kc = torch.zeros(2, cfg.num_key_value_heads, 16, d)
        vc = torch.zeros_like(kc)
        attn = layer.self_attn
        qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        slot = torch.tensor([1])
        for t in range(5):
            pos = torch.tensor([t])
            res, h = TorchOps.add_rms_norm(x[:, t], None, layer.input_layernorm.weight, cfg.rms_norm_eps)
            q = TorchOps.rope_write(torch.nn.functional.linear(h, qkv_w, qkv_b), cos[:, t], sin[:, t], kc, vc, slot,
                                    pos, cfg.num_attention_heads, cfg.num_key_value_heads)
            out = TorchOps.decode_attention(q, kc, vc, slot, pos, attn.scaling, 16)
            res, h = TorchOps.add_rms_norm(res, attn.o_proj(out), layer.post_attention_layernorm.weight,
                                           cfg.rms_norm_eps)
            got = res + layer.mlp.down_proj(TorchOps.silu_mul(layer.mlp.gate_up_proj(h)))
            torch.testing.assert_close(got, want[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="Triton kernels need a GPU")
@pytest.mark.parametrize("shape", [dict(hidden=4096, rank=64, slots=8, widths=(4096, 256, 256)),
                                   dict(hidden=13696, rank=64, slots=8, widths=(4096,)),
                                   dict(hidden=64, rank=8, slots=2, widths=(64, 32, 32))],
                         ids=["chatglm2-qkv", "chatglm2-down", "tiny"])
def test_gathered_lora_kernels_agree_with_the_dense_pass(shape):
    from serving.kernels_lora import check_gathered

    assert check_gathered(torch.device("cuda"), torch.bfloat16, **shape) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="Triton kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_few_row_gemv_agrees_with_cublas_at_chatglm2_shapes(dtype):
    from serving.kernels_gemv import check_gemv

    shapes = {"qkv": (4608, 4096, True, False), "o": (4096, 4096, False, False),
              "gate_up": (27392, 4096, False, False), "down": (4096, 13696, False, True),
              "head": (65024, 4096, False, False)}
    assert check_gemv(torch.device("cuda"), dtype, shapes) is None


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
def test_a_gemv_that_fails_at_start_up_leaves_every_projection_on_cublas_and_says_why():
    """The start-up choice never stops a server: here the check cannot even allocate on the device (no GPU on
    this machine; on a GPU, the weights left on the CPU fail the timing), so every projection stays on cuBLAS."""
    from serving.kernels_gemv import Projections, pick_gemv

    proj = Projections({"o": [(torch.randn(64, 64), None)] * 2, "head": [(torch.randn(96, 64), None)]})
    proj.fast = {"o", "head"}
    assert pick_gemv(proj, torch.device("cuda")) is proj
    assert proj.fast == set()
    assert proj.note.startswith("decode GEMV: cuBLAS (the Triton kernel failed its check: ")
