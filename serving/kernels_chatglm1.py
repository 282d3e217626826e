"""ChatGLM-6B's small operations of an engine step, as one kernel each on a GPU (Triton), PyTorch elsewhere.

ChatGLM-6B differs from the later GLMs around its GEMMs (common/models/modeling_chatglm1.py):

  residual_layer_norm   x = h * alpha + delta (the residual is the previous LayerNorm's *output*, scaled by
                        alpha = sqrt(56)), then LayerNorm with bias; returns the normalised x, the only thing
                        the next sublayer and the next residual need
  rope2d_write          2D rotary straight out of the fused QKV projection (per head [q | k | v]): the first
                        half of each head turns with the position, the second with the block position; k and v
                        written into the cache at (slot, position); q returned as [rows, heads, head_dim]
  gelu                  the tanh form

Attention is GLM's (serving/kernels.py `decode_attention`), given for each token the last position it sees
instead of its own: the whole prompt for prompt tokens, itself for the reply.

`TorchOps1` is the reference: the model's own arithmetic (the tests run the engine with it on CPU, and it
checks the Triton kernels at start-up, `pick_ops1`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.kernels import pick, triton


def rotary_tables(rotary_dim: int, max_len: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, rotary_dim] of every position, as the model's RotaryEmbedding computes them (inverse
    frequencies rounded through fp16, cast to the model's dtype)."""
    from common.models.modeling_chatglm1 import RotaryEmbedding

    cos, sin = RotaryEmbedding(rotary_dim)(torch.arange(max_len, device=device)[None], dtype)
    return cos[0].contiguous(), sin[0].contiguous()


class TorchOps1:
    name = "torch"

    @staticmethod
    def residual_layer_norm(h, delta, alpha: float, weight, bias, eps: float):
        x = h if delta is None else h * alpha + delta
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def rope2d_write(qkv, cos, sin, p0, p1, k_cache, v_cache, slots, positions, heads: int):
        from common.models.modeling_chatglm1 import SelfAttention

        n = qkv.shape[0]
        d = k_cache.shape[-1]
        q, k, v = qkv.view(n, 1, heads, 3 * d).chunk(3, dim=-1)
        c0, s0, c1, s1 = (t[idx][None] for t, idx in ((cos, p0), (sin, p0), (cos, p1), (sin, p1)))
        q = SelfAttention._rotate_2d(q.transpose(0, 1), c0, s0, c1, s1)[0]
        k = SelfAttention._rotate_2d(k.transpose(0, 1), c0, s0, c1, s1)[0]
        k_cache[slots, :, positions] = k
        v_cache[slots, :, positions] = v[:, 0]
        return q

    @staticmethod
    def gelu(x):
        from common.models.modeling_chatglm1 import _gelu

        return _gelu(x)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _residual_layer_norm_kernel(h_ptr, delta_ptr, w_ptr, b_ptr, out_ptr, n, alpha, eps, HAS_DELTA: tl.constexpr,
                                    BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < n
        x = tl.load(h_ptr + row * n + cols, mask=m, other=0.0)
        if HAS_DELTA:  # rounded where the model rounds: h * alpha, then the sum
            scaled = (x.to(tl.float32) * alpha).to(x.dtype)
            x = (scaled.to(tl.float32) + tl.load(delta_ptr + row * n + cols, mask=m, other=0.0).to(tl.float32)).to(
                x.dtype)
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / n
        diff = tl.where(m, xf - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (diff * rstd * w + b).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope2d_write_kernel(qkv_ptr, cos_ptr, sin_ptr, p0_ptr, p1_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr,
                             max_len, HEADS: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        part = tl.program_id(2)  # 0 q, 1 k, 2 v
        HALF: tl.constexpr = D // 2
        QUARTER: tl.constexpr = D // 4
        d = tl.arange(0, D)
        base = qkv_ptr + (row * HEADS + head) * 3 * D + part * D
        x = tl.load(base + d).to(tl.float32)
        slot = tl.load(slot_ptr + row)
        pos = tl.load(pos_ptr + row)
        if part < 2:
            # Each half of the head rotates on its own (rotate_half within it): element i pairs with i + D/4.
            i = d % HALF
            partner = tl.where(i < QUARTER, d + QUARTER, d - QUARTER)
            sign = tl.where(i < QUARTER, -1.0, 1.0)
            other = tl.load(base + partner).to(tl.float32)
            p = tl.where(d < HALF, tl.load(p0_ptr + row), tl.load(p1_ptr + row))
            c = tl.load(cos_ptr + p * HALF + i).to(tl.float32)
            s = tl.load(sin_ptr + p * HALF + i).to(tl.float32)
            y = x * c + sign * other * s
            if part == 0:
                tl.store(q_ptr + (row * HEADS + head) * D + d, y.to(q_ptr.dtype.element_ty))
            else:
                tl.store(k_ptr + ((slot * HEADS + head) * max_len + pos) * D + d, y.to(k_ptr.dtype.element_ty))
        else:
            tl.store(v_ptr + ((slot * HEADS + head) * max_len + pos) * D + d, x.to(v_ptr.dtype.element_ty))

    @triton.jit
    def _gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        inner = 0.7978845608028654 * x * (1.0 + 0.044715 * x * x)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0  # tanh
        tl.store(out_ptr + offs, (0.5 * x * (1.0 + t)).to(out_ptr.dtype.element_ty), mask=m)


class TritonOps1:
    name = "triton"

    @staticmethod
    def residual_layer_norm(h, delta, alpha, weight, bias, eps):
        n = h.shape[-1]
        out = torch.empty_like(h)
        _residual_layer_norm_kernel[(h.numel() // n,)](h, delta if delta is not None else h, weight, bias, out, n,
                                                       float(alpha), eps, HAS_DELTA=delta is not None,
                                                       BLOCK=triton.next_power_of_2(n))
        return out

    @staticmethod
    def rope2d_write(qkv, cos, sin, p0, p1, k_cache, v_cache, slots, positions, heads):
        n = qkv.shape[0]
        d = k_cache.shape[-1]
        q = torch.empty(n, heads, d, dtype=qkv.dtype, device=qkv.device)
        _rope2d_write_kernel[(n, heads, 3)](qkv, cos, sin, p0, p1, q, k_cache, v_cache, slots, positions,
                                             k_cache.shape[2], HEADS=heads, D=d)
        return q

    @staticmethod
    def gelu(x):
        out = torch.empty_like(x)
        n = x.numel()
        _gelu_kernel[(triton.cdiv(n, 4096),)](x, out, n, BLOCK=4096)
        return out


def check_ops1(ops, *, heads: int, head_dim: int, hidden: int, ffn: int, dtype: torch.dtype, device) -> str | None:
    """`ops` against TorchOps1 on random inputs of the model's shapes (and GLM's decode attention with
    ChatGLM-6B's head layout); None if they agree, else what differs."""
    from serving.kernels import Agreement, TorchOps, TritonOps

    check = Agreement(dtype, device)
    rand, close = check.rand, check.close
    b, slots, max_len = 3, 4, 2048
    h, delta, w, bias = rand(b, hidden), rand(b, hidden), rand(hidden), rand(hidden)
    for with_delta in (delta, None):
        close("residual_layer_norm", ops.residual_layer_norm(h, with_delta, 7.48, w, bias, 1e-5),
              TorchOps1.residual_layer_norm(h, with_delta, 7.48, w, bias, 1e-5))
    x = rand(b, ffn)
    close("gelu", ops.gelu(x), TorchOps1.gelu(x))
    cos, sin = rotary_tables(head_dim // 2, max_len, dtype, device)
    qkv = rand(b, heads * 3 * head_dim)
    slot_ids = torch.tensor([2, 0, 3], device=device)
    positions = torch.tensor([0, 700, 1900], device=device)
    p0, p1 = torch.tensor([0, 12, 1500], device=device), torch.tensor([0, 689, 401], device=device)
    k0, v0 = rand(slots, heads, max_len, head_dim), rand(slots, heads, max_len, head_dim)
    out = []
    for impl in (ops, TorchOps1):
        kc, vc = k0.clone(), v0.clone()
        out.append((kc, vc, impl.rope2d_write(qkv, cos, sin, p0, p1, kc, vc, slot_ids, positions, heads)))
    close("rope2d_write q", out[0][2], out[1][2])
    close("rope2d_write k cache", out[0][0], out[1][0])
    close("rope2d_write v cache", out[0][1], out[1][1])
    if ops is not TorchOps1:
        kc, vc, q = out[1]
        close("decode_attention", TritonOps.decode_attention(q, kc, vc, slot_ids, positions, head_dim ** -0.5, 2048),
              TorchOps.decode_attention(q, kc, vc, slot_ids, positions, head_dim ** -0.5, 2048))
    return check.verdict()


def pick_ops1(device: torch.device, **shapes) -> tuple[type, str]:
    """TritonOps1 where they run and agree with the reference, else TorchOps1; and a note saying which."""
    return pick(device, TritonOps1, TorchOps1, check_ops1, "step ops", **shapes)
