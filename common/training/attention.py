"""Variable-length attention for packed rows on CUDA.

A packed row holds many examples back to back. Attention must stay inside each example: for correctness,
and because a dense mask over the whole row costs (row length)^2 while the examples only need the sum
of their own squares. PyTorch's `varlen_attn` (flash attention over cumulative sequence offsets) does
exactly that. It is registered with transformers as the attention implementation "glmops_varlen": calls
that carry the example boundaries (`cu_seq_lens_q`, passed by the training loss for packed rows) run
varlen; every other call (generation, padded batches) runs SDPA with the usual mask, so the model
can stay switched for good, which gradient checkpointing needs (a recomputed layer must take the
same path as its first forward).

On CPU, or with a PyTorch without `varlen_attn`, packed rows fall back to SDPA with the block-diagonal
mask transformers builds from the restarting position ids (same result, more work).
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

NAME = "glmops_varlen"


@lru_cache(maxsize=1)
def _varlen():
    """(varlen_attn, extra kwargs for causal attention, supports GQA) or None where PyTorch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def varlen_available(device: torch.device, dtype: torch.dtype | None) -> bool:
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen() is not None


def rows_mask(device) -> torch.Tensor:
    """What packed rows pass as `attention_mask` on the varlen path: a 4D tensor, which transformers takes as
    a mask already prepared and hands to the attention untouched. Its one element is never read; the
    boundaries travel as `cu_seq_lens_q`."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
               max_length_q=None, **kwargs):
    """transformers attention-function signature: q [1, H, T, D], k/v [1, Hkv, T, D] → ([1, T, H, D], None)."""
    if cu_seq_lens_q is None:
        if attention_mask is not None and attention_mask.numel() == 1 and query.shape[2] > 1:
            raise ValueError("packed rows' placeholder mask came without their example boundaries (cu_seq_lens_q)")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    varlen_attn, causal, gqa = _varlen()
    dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))  # [T, heads, D]
    extra = dict(causal)
    if k.shape[1] != q.shape[1]:
        if gqa:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling, **extra)
    return out.unsqueeze(0), None


@lru_cache(maxsize=1)
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the SDPA fallback needs its masks


def use_varlen(model) -> None:
    """Switch `model` (a transformers model, or peft around one) to varlen attention for packed rows."""
    register()
    model.config._attn_implementation = NAME


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    """Cumulative offsets [0, l0, l0+l1, ...] as varlen_attn wants them (int32)."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)
