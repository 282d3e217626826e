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
of ChatGLM2-6B that is ~266 MB per slot against the base's 12.5 GB. A gathered kernel (Punica's BGMV) would
read only the adapters a step uses; it pays when many slots are idle (see the README, "Several fine-tunes").
"""

from __future__ import annotations

import torch


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
