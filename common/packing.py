"""Micro-batches for training: padding-free packing under a token budget, or pad-to-longest.

Packed rows hold several examples back to back with position ids restarting at 0 for each, and carry
the example boundaries (`cu_seqlens`): on CUDA, attention runs per example through varlen attention
(common/attention.py); elsewhere transformers' mask builder turns the restarting positions into a
block-diagonal causal mask. Either way no example attends to another (tests/test_packing.py checks
per-example losses are unchanged).
Labels are shifted per example before packing (`targets[t]` is what logits[t] must predict), so no
example is ever asked to predict the next one's first token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from common.attention import cu_seqlens
from common.templates import IGNORE, Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor       # [rows, length]
    position_ids: torch.Tensor    # [rows, length]
    targets: torch.Tensor         # [rows, length]: next-token labels, IGNORE where nothing is learned
    attention_mask: torch.Tensor | None  # [rows, length] for padded batches; None when packed
    num_tokens: int               # real tokens (pads excluded)
    num_targets: int              # supervised tokens
    cu_seqlens: torch.Tensor | None = None  # packed rows: example boundaries [0, l0, l0+l1, ...] (int32)
    max_seqlen: int = 0                      # packed rows: the longest example

    def to(self, device) -> Batch:
        def move(x):
            return x.to(device) if x is not None else None
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                     move(self.attention_mask), self.num_tokens, self.num_targets, move(self.cu_seqlens),
                     self.max_seqlen)


def shifted_targets(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE]


def pack(examples: list[Encoded], order: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy in-order packing: example indices per row, each row at most `max_tokens` tokens."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = min(len(examples[i].input_ids), max_tokens)
        if current and used + n > max_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def packed_batch(examples: list[Encoded], row: list[int], max_tokens: int) -> Batch:
    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    lengths: list[int] = []
    for i in row:
        e = examples[i]
        n = min(len(e.input_ids), max_tokens)
        ids += e.input_ids[:n]
        pos += list(range(n))
        tgt += shifted_targets(e.labels)[:n]
        lengths.append(n)
    t = torch.tensor
    return Batch(t([ids]), t([pos]), t([tgt]), None, len(ids), sum(1 for x in tgt if x != IGNORE),
                 cu_seqlens(lengths), max(lengths))


def padded_batch(examples: list[Encoded], group: list[int], pad_id: int) -> Batch:
    """Right-padded rows with an attention mask (the seed's way, and ChatGLM-6B's)."""
    length = max(len(examples[i].input_ids) for i in group)
    ids, pos, tgt, mask = [], [], [], []
    for i in group:
        e = examples[i]
        pad = length - len(e.input_ids)
        ids.append(e.input_ids + [pad_id] * pad)
        pos.append(list(range(len(e.input_ids))) + [0] * pad)
        tgt.append(shifted_targets(e.labels) + [IGNORE] * pad)
        mask.append([1] * len(e.input_ids) + [0] * pad)
    t = torch.tensor
    n_tok = sum(sum(m) for m in mask)
    n_tgt = sum(1 for row in tgt for x in row if x != IGNORE)
    return Batch(t(ids), t(pos), t(tgt), t(mask), n_tok, n_tgt)


def epoch_batches(examples: list[Encoded], *, epoch: int, seed: int, packing: bool, max_tokens: int,
                  batch_size: int, pad_id: int) -> list[Batch]:
    """All micro-batches of one epoch, in a deterministic order (seed, epoch): the resume contract."""
    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    if packing:
        return [packed_batch(examples, row, max_tokens) for row in pack(examples, order, max_tokens)]
    groups = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return [padded_batch(examples, g, pad_id) for g in groups]
