"""The decode step's small operations, as one kernel each on a GPU (Triton) and as plain PyTorch elsewhere.

A decode step of a 6B model reads ~12 GB of weights (≈ 2.9 ms on an H200); everything around the GEMMs is
tiny, so what it costs is the number of kernels. transformers' layer runs ~30 per layer (norms, rotary,
cache writes and gathers, the mask, SDPA, copies); these five cover the same work in five:

  add_rms_norm    x + delta and RMSNorm of the sum, both returned (the residual and the next input); with
                  `delta_weight`, delta is RMS-normed first (GLM-4-0414's post-attention and post-MLP norms,
                  Glm4ForCausalLM), in the same kernel
  rope_write      rotary on q and k straight out of the fused QKV projection; k and v written into the
                  cache at (slot, position); q returned as [rows, heads, head_dim]
  decode_attention
                  one query token per row against its slot's cache, read in place up to its position
                  (split along the sequence for long ones, then one combine), grouped queries sharing
                  each KV head's reads
  silu_mul        SwiGLU of the fused gate/up projection

`TorchOps` is the reference: the arithmetic of transformers' GLM layer (it runs on CPU, where the tests
run the engine, and checks the Triton kernels at start-up). `TritonOps` is used on CUDA when Triton is
importable and its kernels agree with the reference on the model's shapes (`pick_ops`).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F


class TorchOps:
    name = "torch"

    @staticmethod
    def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     delta_weight: torch.Tensor | None = None):
        if delta is not None:
            x = x + (delta if delta_weight is None else TorchOps.rms_norm(delta, delta_weight, eps))
        return x, TorchOps.rms_norm(x, weight, eps)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @staticmethod
    def rope_write(qkv, cos, sin, k_cache, v_cache, slots, positions, heads: int, kv_heads: int):
        """qkv [B, (H + 2 KV) D]; cos/sin [B, rot] as GLM's rotary module returns them (halves repeated)."""
        from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

        b = qkv.shape[0]
        d = k_cache.shape[-1]
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k = apply_rotary_pos_emb(q.view(b, heads, 1, d), k.view(b, kv_heads, 1, d), cos[:, None], sin[:, None])
        k_cache[slots, :, positions] = k[:, :, 0]
        v_cache[slots, :, positions] = v.view(b, kv_heads, d)
        return q[:, :, 0]

    @staticmethod
    def decode_attention(q, k_cache, v_cache, slots, positions, scale: float, bucket: int):
        """q [N, H, D], one query token per row; each attends to positions 0..position of its slot.
        Returns [N, H D]. Rows of one slot next to each other (a prompt chunk) read their slot once."""
        n, heads, d = q.shape
        kv_heads = k_cache.shape[1]
        groups = heads // kv_heads
        keys = torch.arange(bucket, device=q.device)
        runs = _slot_runs(slots)
        if runs is None:  # one token per sequence (decode): gather each row's slot
            kc, vc = k_cache[:, :, :bucket][slots], v_cache[:, :, :bucket][slots]
            mask = (keys[None, :] <= positions[:, None])[:, None, None].expand(n, 1, groups, bucket)
            out = F.scaled_dot_product_attention(q.view(n, kv_heads, groups, d), kc, vc, attn_mask=mask, scale=scale)
            return out.reshape(n, heads * d)
        out = q.new_empty(n, heads * d)
        for slot, start, end in runs:  # prompt chunks: the slot's cache once, its tokens as query rows
            m = end - start
            qg = q[start:end].view(m, kv_heads, groups, d).permute(1, 2, 0, 3).reshape(1, kv_heads, groups * m, d)
            mask = (keys[None, :] <= positions[start:end, None]).repeat(groups, 1)  # rows in (group, token) order
            o = F.scaled_dot_product_attention(qg, k_cache[slot, :, :bucket][None], v_cache[slot, :, :bucket][None],
                                               attn_mask=mask, scale=scale)
            out[start:end] = o.view(kv_heads, groups, m, d).permute(2, 0, 1, 3).reshape(m, heads * d)
        return out

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return up * F.silu(gate)


def _slot_runs(slots: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(slot, first row, end row) of each run of equal slots, or None when no slot repeats (or inside a CUDA
    graph capture, where reading the slots on the host is not allowed: decode steps, one token per slot)."""
    if slots.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    ids = slots.tolist()
    if len(set(ids)) == len(ids):
        return None
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            runs.append((ids[start], start, i))
            start = i
    return runs


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the reference ops only
    triton = None


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, dw_ptr, sum_ptr, out_ptr, n, eps, HAS_DELTA: tl.constexpr,
                             NORM_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=m, other=0.0)
        if HAS_DELTA:
            d = tl.load(delta_ptr + row * n + cols, mask=m, other=0.0)
            if NORM_DELTA:  # RMSNorm of delta first, rounded as the model's own norm rounds
                df = d.to(tl.float32)
                drstd = 1.0 / tl.sqrt(tl.sum(df * df, axis=0) / n + eps)
                dw = tl.load(dw_ptr + cols, mask=m, other=0.0)
                d = ((df * drstd).to(x.dtype).to(tl.float32) * dw.to(tl.float32)).to(x.dtype)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * n + cols, x, mask=m)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        normed = (xf * rstd).to(x.dtype)
        tl.store(out_ptr + row * n + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=m)

    @triton.jit
    def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, qkv_stride,
                           rot_stride, max_len, HEADS: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
                           ROT: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        d = tl.arange(0, D)
        base = qkv_ptr + row * qkv_stride + head * D
        x = tl.load(base + d).to(tl.float32)
        slot = tl.load(slot_ptr + row)
        pos = tl.load(pos_ptr + row)
        if head < HEADS + KV:
            # GLM's interleaved partial rotary: pairs (2i, 2i+1) of the first ROT dims turn by angle i.
            partner = tl.load(base + (d ^ 1)).to(tl.float32)
            rot = d < ROT
            c = tl.load(cos_ptr + row * rot_stride + (d // 2), mask=rot, other=1.0).to(tl.float32)
            s = tl.load(sin_ptr + row * rot_stride + (d // 2), mask=rot, other=0.0).to(tl.float32)
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
            y = tl.where(rot, x * c + sign * partner * s, x)
            if head < HEADS:
                tl.store(q_ptr + (row * HEADS + head) * D + d, y.to(q_ptr.dtype.element_ty))
            else:
                off = ((slot * KV + (head - HEADS)) * max_len + pos) * D
                tl.store(k_ptr + off + d, y.to(k_ptr.dtype.element_ty))
        else:
            off = ((slot * KV + (head - HEADS - KV)) * max_len + pos) * D
            tl.store(v_ptr + off + d, x.to(v_ptr.dtype.element_ty))

    @triton.jit
    def _attend_block(q, k_ptr, v_ptr, base, start, hi, scale, m_i, l_i, acc, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """One block of positions [start, start + BLOCK_N) below `hi`, folded into the online softmax."""
        d = tl.arange(0, D)
        n = start + tl.arange(0, BLOCK_N)
        nm = n < hi
        k = tl.load(k_ptr + (base + n)[:, None] * D + d[None, :], mask=nm[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nm[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: weights stay 0, not NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (base + n)[:, None] * D + d[None, :], mask=nm[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, out_ptr, part_ptr, stat_ptr, scale,
                                 max_len, split_len, HEADS: tl.constexpr, KV: tl.constexpr, G: tl.constexpr,
                                 GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                                 IEEE: tl.constexpr, ITERS: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(slot_ptr + row)
        length = tl.load(pos_ptr + row) + 1
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        gm = g < G
        heads = kvh * G + g
        q = tl.load(q_ptr + (row * HEADS + heads)[:, None] * D + d[None, :], mask=gm[:, None], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        base = (slot * KV + kvh) * max_len
        lo = split * split_len
        hi = tl.minimum(lo + split_len, length)
        if ITERS == 0:  # only the blocks up to this row's length
            for it in range(0, tl.cdiv(hi - lo, BLOCK_N)):
                m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, base, lo + it * BLOCK_N, hi, scale, m_i, l_i, acc, D,
                                              BLOCK_N, IEEE)
        else:  # Triton's interpreter (the CPU check) needs a loop bound that is a number
            for it in range(0, ITERS):
                m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, base, lo + it * BLOCK_N, hi, scale, m_i, l_i, acc, D,
                                              BLOCK_N, IEEE)
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(out_ptr + (row * HEADS + heads)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=gm[:, None])
        else:
            # Partial results of this split: the unnormalized sum, its running max and its weight.
            part = (row * HEADS + heads) * SPLITS + split
            tl.store(part_ptr + part[:, None] * D + d[None, :], acc, mask=gm[:, None])
            tl.store(stat_ptr + part * 2, m_i, mask=gm)
            tl.store(stat_ptr + part * 2 + 1, l_i, mask=gm)

    @triton.jit
    def _combine_kernel(part_ptr, stat_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr):
        head_row = tl.program_id(0)  # row * HEADS + head
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        m = tl.load(stat_ptr + (head_row * SPLITS + s) * 2)
        weight = tl.load(stat_ptr + (head_row * SPLITS + s) * 2 + 1)
        top = tl.max(m, axis=0)
        scale = tl.where(weight > 0, tl.exp(m - top), 0.0)
        acc = tl.load(part_ptr + (head_row * SPLITS + s)[:, None] * D + d[None, :])
        out = tl.sum(acc * scale[:, None], axis=0) / tl.sum(weight * scale, axis=0)
        tl.store(out_ptr + head_row * D + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        gate = tl.load(gu_ptr + row * 2 * n + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * n + n + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (up * gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty), mask=m)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ATTENTION_BLOCK = 64
SPLIT_LEN = 512  # positions per program of decode attention; longer buckets are split and combined


class TritonOps:
    name = "triton"

    @staticmethod
    def add_rms_norm(x, delta, weight, eps, delta_weight=None):
        n = x.shape[-1]
        rows = x.numel() // n
        out = torch.empty_like(x)
        total = torch.empty_like(x) if delta is not None else x
        _add_rms_norm_kernel[(rows,)](x, delta if delta is not None else x, weight,
                                      delta_weight if delta_weight is not None else weight, total, out, n, eps,
                                      HAS_DELTA=delta is not None, NORM_DELTA=delta_weight is not None,
                                      BLOCK=triton.next_power_of_2(n))
        return total, out

    @staticmethod
    def rope_write(qkv, cos, sin, k_cache, v_cache, slots, positions, heads, kv_heads):
        b = qkv.shape[0]
        d = k_cache.shape[-1]
        rot = cos.shape[-1]
        q = torch.empty(b, heads, d, dtype=qkv.dtype, device=qkv.device)
        _rope_write_kernel[(b, heads + 2 * kv_heads)](
            qkv, cos, sin, q, k_cache, v_cache, slots, positions, qkv.stride(0), cos.stride(0), k_cache.shape[2],
            HEADS=heads, KV=kv_heads, D=d, ROT=rot)
        return q

    @staticmethod
    def decode_attention(q, k_cache, v_cache, slots, positions, scale, bucket):
        b, heads, d = q.shape
        kv = k_cache.shape[1]
        g = heads // kv
        splits = triton.next_power_of_2(triton.cdiv(bucket, SPLIT_LEN))  # a power of two: the combine's range
        out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
        if splits > 1:
            part = torch.empty(b * heads * splits, d, dtype=torch.float32, device=q.device)
            stat = torch.empty(b * heads * splits, 2, dtype=torch.float32, device=q.device)
        else:
            part = stat = out
        _decode_attention_kernel[(b, kv, splits)](
            q, k_cache, v_cache, slots, positions, out, part, stat, scale, k_cache.shape[2],
            math.ceil(bucket / splits), HEADS=heads, KV=kv, G=g, GP=max(16, triton.next_power_of_2(g)), D=d,
            BLOCK_N=ATTENTION_BLOCK, SPLITS=splits, IEEE=q.dtype == torch.float32,
            ITERS=triton.cdiv(math.ceil(bucket / splits), ATTENTION_BLOCK) if INTERPRETED else 0)
        if splits > 1:
            _combine_kernel[(b * heads,)](part, stat, out, D=d, SPLITS=splits)
        return out.view(b, heads * d)

    @staticmethod
    def silu_mul(gate_up):
        n = gate_up.shape[-1] // 2
        rows = gate_up.numel() // (2 * n)
        out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
        block = min(4096, triton.next_power_of_2(n))
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
        return out


class Agreement:
    """Seeded random inputs in `dtype` on `device`, and the outputs that differ from the reference's beyond the
    dtype's tolerance (relative to the reference's largest value)."""

    def __init__(self, dtype: torch.dtype, device):
        self.gen = torch.Generator(device="cpu").manual_seed(0)
        self.dtype, self.device = dtype, device
        self.tol = 2e-2 if dtype != torch.float32 else 1e-4
        self.problems: list[str] = []

    def rand(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=self.dtype)

    def close(self, name: str, a: torch.Tensor, ref: torch.Tensor) -> None:
        err = (a.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item() + 1e-6
        if not err <= self.tol * max(1.0, scale):
            self.problems.append(f"{name}: max error {err:.3g}")

    def verdict(self) -> str | None:
        return "; ".join(self.problems) or None


def check_ops(ops, *, heads: int, kv_heads: int, head_dim: int, rot: int, hidden: int, ffn: int,
              dtype: torch.dtype, device) -> str | None:
    """Run `ops` and TorchOps on random inputs of the model's shapes; None if they agree, else what differs."""
    check = Agreement(dtype, device)
    rand, close, gen = check.rand, check.close, check.gen
    b, slots, max_len = 3, 4, 2048

    x, delta, w, dw = rand(b, hidden), rand(b, hidden), rand(hidden), rand(hidden)
    for with_delta, delta_weight in ((delta, None), (None, None), (delta * 30, dw)):
        got = ops.add_rms_norm(x, with_delta, w, 1e-5, delta_weight)
        ref = TorchOps.add_rms_norm(x, with_delta, w, 1e-5, delta_weight)
        what = "add_rms_norm" + (" (delta normed)" if delta_weight is not None else "")
        close(f"{what} sum", got[0], ref[0])
        close(f"{what} norm", got[1], ref[1])
    gu = rand(b, 2 * ffn)
    close("silu_mul", ops.silu_mul(gu), TorchOps.silu_mul(gu))
    qkv = rand(b, (heads + 2 * kv_heads) * head_dim)
    angles = torch.rand(b, rot // 2, generator=gen).to(device) * 6.0
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    slot_ids = torch.tensor([2, 0, 3], device=device)
    positions = torch.tensor([0, 700, 1900], device=device)
    k0, v0 = rand(slots, kv_heads, max_len, head_dim), rand(slots, kv_heads, max_len, head_dim)
    caches = []
    for impl in (ops, TorchOps):  # each writes into its own copy of the same random cache
        kc, vc = k0.clone(), v0.clone()
        caches.append((kc, vc, impl.rope_write(qkv, cos, sin, kc, vc, slot_ids, positions, heads, kv_heads)))
    close("rope_write q", caches[0][2], caches[1][2])
    close("rope_write k cache", caches[0][0], caches[1][0])
    close("rope_write v cache", caches[0][1], caches[1][1])
    kc, vc, q = caches[1]
    chunk = (torch.tensor([3, 3, 3, 0], device=device), torch.tensor([10, 11, 12, 200], device=device))
    for bucket in (256, 2048):
        pos = positions.clamp(max=bucket - 1)
        close(f"decode_attention (bucket {bucket})",
              ops.decode_attention(q, kc, vc, slot_ids, pos, head_dim ** -0.5, bucket),
              TorchOps.decode_attention(q, kc, vc, slot_ids, pos, head_dim ** -0.5, bucket))
        qs = q[[0, 1, 2, 0]]  # a prompt chunk (three tokens of one slot) beside a decode row
        close(f"decode_attention, prompt chunk (bucket {bucket})",
              ops.decode_attention(qs, kc, vc, *chunk, head_dim ** -0.5, bucket),
              TorchOps.decode_attention(qs, kc, vc, *chunk, head_dim ** -0.5, bucket))
    return check.verdict()


def pick(device: torch.device, fast: type, reference: type, check, what: str, **shapes) -> tuple[type, str]:
    """`fast` (Triton) where it runs and `check` finds it agrees with `reference`, else `reference`; and a note
    saying which ran."""
    if device.type != "cuda":
        return reference, ""
    if triton is None:
        return reference, f"Triton is not installed: {what} in PyTorch"
    try:
        problem = check(fast, device=device, **shapes)
    except Exception as err:  # noqa: BLE001 - any failure means: use the reference
        problem = f"{type(err).__name__}: {err}"
    if problem:
        return reference, f"Triton {what} disagree with the reference ({problem}): {what} in PyTorch"
    return fast, f"Triton {what}"


def pick_ops(device: torch.device, **shapes) -> tuple[type, str]:
    """TritonOps where they run and agree with the reference, else TorchOps; and a note saying which."""
    return pick(device, TritonOps, TorchOps, check_ops, "decode ops", **shapes)
