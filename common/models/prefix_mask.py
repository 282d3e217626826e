"""ChatGLM-6B's attention over packed rows: each example bidirectional over its prompt, causal over its reply,
nothing across examples.

A packed row is described by its example boundaries (`cu_seqlens` [0, l0, l0+l1, ...]) and each example's
prompt length (`prefix_lens`: the tokens before <sop>, which every token of the example sees). From them:

  dense_mask    the [T, T] matrix of what each token sees (CPU, tests): T^2 booleans
  block_mask    FlexAttention's BlockMask (CUDA): per 128x128 tile of the row, whether it is skipped,
                computed in full, or computed with the mask; built with a few vectorised ops over the
                tiles from the boundaries alone (no [T, T] matrix, no wait for the GPU), so attention costs
                the sum of the examples' own squares, as varlen flash attention does for the other families

Both say the same thing (tests/test_chatglm1_packing.py compares them, and the block mask with FlexAttention's
own `create_block_mask`).
"""

from __future__ import annotations

import torch

TILE = 128  # FlexAttention's block size


def token_spans(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, length: int):
    """Per token of the row: its example (doc), where its example starts, and where its prompt ends
    (exclusive). `length` is the row's token count (cu_seqlens[-1], passed so nothing is read back)."""
    cu = cu_seqlens.long()
    t = torch.arange(length, device=cu.device)
    doc = torch.searchsorted(cu[1:], t, right=True)
    start = cu[doc]
    prompt_end = start + prefix_lens.long()[doc]
    return doc, start, prompt_end


def visible(doc, prompt_end, q, k):
    """Does token q see token k? Same example, and k is in the prompt or not after q."""
    return (doc[q] == doc[k]) & ((k <= q) | (k < prompt_end[q]))


def dense_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, T, T], True where attention is *hidden* (the convention of ChatGLM1Model's masks)."""
    doc, _, prompt_end = token_spans(cu_seqlens, prefix_lens, length)
    t = torch.arange(length, device=doc.device)
    return ~visible(doc, prompt_end, t[:, None], t[None, :])[None, None]


def block_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, length: int):
    """FlexAttention's BlockMask for a packed row of `length` tokens (on the boundaries' device)."""
    from torch.nn.attention.flex_attention import BlockMask

    doc, start, prompt_end = token_spans(cu_seqlens, prefix_lens, length)
    n = (length + TILE - 1) // TILE
    lo = torch.arange(n, device=doc.device) * TILE          # first token of each tile
    hi = torch.clamp(lo + TILE, max=length) - 1             # last token of each tile
    # What a query tile sees is one contiguous range of keys: from the start of its first token's example to
    # the furthest key any of its tokens sees (its last token's example has the furthest prompt end).
    see_from = start[lo]
    see_to = torch.maximum(hi, prompt_end[hi] - 1)
    any_seen = (lo[None, :] <= see_to[:, None]) & (hi[None, :] >= see_from[:, None])  # [q tile, kv tile]
    # A pair of tiles is seen in full when both lie in one example and every key is at most the furthest key
    # the tile's first query sees. The row's last tile, when cut short, is never full (as FlexAttention's own
    # builder has it: positions past the row's end are not seen).
    one_doc = (doc[lo] == doc[hi]) & (hi - lo + 1 == TILE)
    same = one_doc[:, None] & one_doc[None, :] & (doc[lo][:, None] == doc[lo][None, :])
    full = same & (hi[None, :] <= torch.maximum(lo, prompt_end[lo] - 1)[:, None])
    partial = any_seen & ~full

    def listed(tiles: torch.Tensor):
        counts = tiles.sum(-1, dtype=torch.int32)
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # seen tiles first
        return counts[None, None], order[None, None]

    def mask_mod(b, h, q, k):
        return visible(doc, prompt_end, q, k)

    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                    seq_lengths=(length, length))
