"""Per-row LoRA deltas for a batch whose rows use different adapters (or none), in one pass per linear.

Each targeted linear of the pool (serving/lora.py) keeps every slot's adapter side by side:

  A  [in, slots * parts * rank]     the down-projections ("shrink"), slot by slot
  B  [slots * rank, width] per part the up-projections ("expand") of each output part (q, k, v of a fused QKV)

and a step gives each token a row of `gates` [tokens, slots]: its adapter's scale (alpha / r) in its slot's
column, 0 elsewhere (all 0 for the base model). Then

  delta = ((h @ A) * gates) @ B      (the gates widened over parts and rank)

adds to each token its own adapter's delta and nothing of the others' (their terms are multiplied by an
exact 0). Ranks below the pool's are zero-padded. Shapes never depend on which adapters a step holds, so a
step is captured in a CUDA graph once and replayed with any mix of adapters (`gates` is a graph input).

The cost is reading every slot's A and B in each step, whichever adapters it uses: with r=64 on all linears
of ChatGLM2-6B that is ~254 MiB per slot against the base's 12.5 GB, in 3 to 5 small kernels per linear.

On a GPU, steps of at most `lora_gather_max` tokens (an app argument, 16 by default; decode at low
concurrency, where those reads and launches are most of the LoRA cost) go through two gathered Triton kernels
instead (Punica's BGMV, written for this
layout): `shrink` reads, for each token, only its own slot's columns of A and scales by its adapter's scale;
`expand` reads only its slot's rows of each part's B and adds into y, all parts in one launch. Base rows read
nothing. With many tokens the dense pass should win: tokens of one adapter then share its reads.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the dense pass only
    triton = None


def gates_for(loras: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[tokens, slots]: each token's adapter scale in its slot's column (loras[i] = -1: the base, all zero)."""
    slots = torch.arange(scales.shape[0], device=loras.device)
    return ((loras[:, None] == slots[None, :]).to(scales.dtype) * scales[None, :]).to(dtype)


def add_lora(y: torch.Tensor, h: torch.Tensor, gates: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
             offsets: list[int]) -> torch.Tensor:
    """y [N, out] (a linear's fresh output, added to in place) plus each token's LoRA delta: h [N, in] through
    `a` [in, S * P * R], gated per slot, then each part p's `bs[p]` [S * R, width_p] into y's columns from
    offsets[p]."""
    n, slots = gates.shape
    t = (h @ a).view(n, slots, len(bs), -1) * gates[:, :, None, None]
    for p, (b, start) in enumerate(zip(bs, offsets)):
        y[:, start:start + b.shape[1]].addmm_(t[:, :, p].reshape(n, -1), b)
    return y


if triton is not None:

    @triton.jit
    def _shrink_kernel(h_ptr, a_ptr, slots_ptr, part_ptr, stride_h, stride_a, K: tl.constexpr, PR: tl.constexpr,
                       SPLITS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """part[i, split, :PR] = h[i, split's K range] @ A[that range, s_i * PR:(s_i + 1) * PR] (s_i = -1, a base
        row: nothing read or written). K is split over programs: one program per token would stream a whole
        slice of A alone (a few MB on one SM: the first version took 25 ms per step)."""
        i = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        in_cols = cols < PR
        s = tl.load(slots_ptr + i)
        if s >= 0:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, SPLIT_K, BLOCK_K):
                ks = split * SPLIT_K + k0 + tl.arange(0, BLOCK_K)
                hk = tl.load(h_ptr + i * stride_h + ks, mask=ks < K, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + ks[:, None] * stride_a + s * PR + cols[None, :],
                            mask=(ks < K)[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(hk[:, None] * a, axis=0)
            tl.store(part_ptr + (i * SPLITS + split) * PR + cols, acc, mask=in_cols)

    @triton.jit
    def _expand_part(t_row, b_ptr, stride_b, y_row, s, scale, c0, W: tl.constexpr, R: tl.constexpr, PR: tl.constexpr,
                     SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        cols = c0 + tl.arange(0, BLOCK_N)
        rs = tl.arange(0, BLOCK_R)
        tv = tl.zeros([BLOCK_R], dtype=tl.float32)
        for sp in range(SPLITS):  # the shrink's partial sums, in a fixed order (deterministic)
            tv += tl.load(t_row + sp * PR + rs, mask=rs < R, other=0.0)
        tv = tv * scale
        b = tl.load(b_ptr + (s * R + rs)[:, None] * stride_b + cols[None, :],
                    mask=(rs < R)[:, None] & (cols < W)[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(tv[:, None] * b, axis=0)
        y = tl.load(y_row + cols, mask=cols < W, other=0.0)
        tl.store(y_row + cols, (y.to(tl.float32) + delta).to(y.dtype), mask=cols < W)

    @triton.jit
    def _expand_kernel(part_ptr, b0, b1, b2, slots_ptr, scales_ptr, y_ptr, stride_y, sb0, sb1, sb2,
                       W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, O0: tl.constexpr, O1: tl.constexpr,
                       O2: tl.constexpr, NB0: tl.constexpr, NB1: tl.constexpr, R: tl.constexpr, PR: tl.constexpr,
                       SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[i, O_p:O_p + W_p] += scale[s_i] * t[i, p * R:(p + 1) * R] @ B_p[s_i * R:(s_i + 1) * R] for the up-to-three
        parts p, t summed from the shrink's partials; the column blocks of all parts are one grid axis."""
        i = tl.program_id(0)
        blk = tl.program_id(1)
        s = tl.load(slots_ptr + i)
        if s >= 0:
            t_row = part_ptr + i * SPLITS * PR
            y_row = y_ptr + i * stride_y
            scale = tl.load(scales_ptr + s)
            if blk < NB0:
                _expand_part(t_row, b0, sb0, y_row + O0, s, scale, blk * BLOCK_N, W0, R, PR, SPLITS, BLOCK_R, BLOCK_N)
            elif blk < NB0 + NB1:
                _expand_part(t_row + R, b1, sb1, y_row + O1, s, scale, (blk - NB0) * BLOCK_N, W1, R, PR, SPLITS,
                             BLOCK_R, BLOCK_N)
            else:
                _expand_part(t_row + 2 * R, b2, sb2, y_row + O2, s, scale, (blk - NB0 - NB1) * BLOCK_N, W2, R, PR,
                             SPLITS, BLOCK_R, BLOCK_N)


SHRINK_SPLIT_K, SHRINK_BLOCK_K, SHRINK_BLOCK_N, EXPAND_BLOCK_N = 256, 64, 64, 128


def add_lora_gathered(y: torch.Tensor, h: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor, a: torch.Tensor,
                      bs: list[torch.Tensor], offsets: list[int]) -> torch.Tensor:
    """add_lora's result through the gathered kernels: `slots` [N] each token's slot (-1: the base) instead of
    gates. Up to three parts (a fused QKV)."""
    n, k = h.shape
    parts = len(bs)
    rank = bs[0].shape[0] // scales.shape[0]
    splits = triton.cdiv(k, SHRINK_SPLIT_K)
    part = torch.empty(n, splits, parts * rank, dtype=torch.float32, device=h.device)
    h = h.contiguous()
    _shrink_kernel[(n, triton.cdiv(parts * rank, SHRINK_BLOCK_N), splits)](
        h, a, slots, part, h.stride(0), a.stride(0), K=k, PR=parts * rank, SPLITS=splits, SPLIT_K=SHRINK_SPLIT_K,
        BLOCK_K=SHRINK_BLOCK_K, BLOCK_N=SHRINK_BLOCK_N)
    widths = [b.shape[1] for b in bs] + [0] * (3 - parts)
    starts = list(offsets) + [0] * (3 - parts)
    blocks = [triton.cdiv(w, EXPAND_BLOCK_N) for w in widths]
    b = list(bs) + [bs[0]] * (3 - parts)
    _expand_kernel[(n, sum(blocks))](
        part, b[0], b[1], b[2], slots, scales, y, y.stride(0), b[0].stride(0), b[1].stride(0), b[2].stride(0),
        W0=widths[0], W1=widths[1], W2=widths[2], O0=starts[0], O1=starts[1], O2=starts[2], NB0=blocks[0],
        NB1=blocks[1], R=rank, PR=parts * rank, SPLITS=splits, BLOCK_R=triton.next_power_of_2(rank),
        BLOCK_N=EXPAND_BLOCK_N)
    return y


def check_gathered(device: torch.device, dtype: torch.dtype = torch.bfloat16, hidden: int = 256, rank: int = 16,
                   slots: int = 3, widths: tuple[int, ...] = (256, 64, 64)) -> str | None:
    """None when the gathered kernels give add_lora's result on random inputs (base rows and every slot), else
    what differs: the start-up check before they are used."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    n = 7
    h, y = rand(n, hidden), rand(n, sum(widths))
    a = rand(hidden, slots * len(widths) * rank, scale=hidden ** -0.5)
    bs = [rand(slots * rank, w, scale=0.1) for w in widths]
    offsets = [sum(widths[:p]) for p in range(len(widths))]
    scales = torch.tensor(([0.5, 2.0, 1.0] * slots)[:slots], device=device)
    loras = torch.tensor([s if s < slots else s % slots for s in (-1, 0, 1, 2, 0, -1, 2)], device=device)
    want = add_lora(y.clone(), h, gates_for(loras, scales, dtype), a, bs, offsets).float()
    got = add_lora_gathered(y.clone(), h, loras, scales, a, bs, offsets).float()
    err = (got - want).abs().max().item()
    tol = 2e-2 * want.abs().max().item() + 1e-3
    return None if err <= tol else f"max abs difference {err:.3g} over {tol:.3g}"
