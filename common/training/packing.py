"""Micro-batches for training: padding-free packing under a token budget, or pad-to-longest.

Packed rows hold several examples back to back with position ids restarting at 0 for each, and carry
the example boundaries (`cu_seqlens`): on CUDA, attention runs per example through varlen attention
(common/training/attention.py); elsewhere transformers' mask builder turns the restarting positions into a
block-diagonal causal mask. Either way no example attends to another (tests/test_packing.py checks
per-example losses are unchanged).
Labels are shifted per example before packing (`targets[t]` is what logits[t] must predict), so no
example is ever asked to predict the next one's first token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.templates import IGNORE, Encoded
from common.training.attention import cu_seqlens


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
    # Flat indices of the supervised positions (targets != IGNORE), found on the host while building the
    # batch: the loss gathers them with a fixed-size index instead of a boolean mask, whose size the GPU
    # would have to report back mid-step (a host sync).
    supervised: torch.Tensor | None = None
    # packed ChatGLM-6B rows: each example's prompt length (the tokens before <sop>, which all of its tokens see);
    # position_ids are then its 2D positions [rows, 2, length]
    prefix_lens: torch.Tensor | None = None
    # which sequence (example, or half of a preference pair) each supervised position belongs to, in order
    sequence_of: torch.Tensor | None = None
    num_sequences: int = 0
    examples: np.ndarray | None = None  # the epoch plan's example indices it holds (host side)

    def to(self, device, non_blocking: bool = False) -> Batch:
        """On `device`. `non_blocking` on CUDA: copied from pinned memory without waiting, so the host can build
        and upload the next step's batches while the GPU still runs this one (a copy from pageable memory
        waits for every kernel already queued)."""
        pin = non_blocking and torch.device(device).type == "cuda"

        def move(x):
            if x is None:
                return None
            return x.pin_memory().to(device, non_blocking=True) if pin else x.to(device)
        return Batch(move(self.input_ids), move(self.position_ids), move(self.targets), move(self.attention_mask),
                     self.num_tokens, self.num_targets, move(self.cu_seqlens), self.max_seqlen, move(self.supervised),
                     move(self.prefix_lens), move(self.sequence_of), self.num_sequences, self.examples)


def shifted_targets(labels) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    return np.concatenate([labels[1:], np.full(min(1, len(labels)), IGNORE, dtype=np.int64)])


def greedy_rows(lengths: list[int], max_tokens: int) -> list[int]:
    """Row boundaries of greedy in-order packing: each row at most `max_tokens` tokens."""
    bounds, used = [0], 0
    for i, n in enumerate(lengths):
        if i > bounds[-1] and used + n > max_tokens:
            bounds.append(i)
            used = 0
        used += n
    bounds.append(len(lengths))
    return bounds


def pack(examples: list[Encoded], order: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy in-order packing: example indices per row, each row at most `max_tokens` tokens."""
    b = greedy_rows([min(len(examples[i].input_ids), max_tokens) for i in order], max_tokens)
    return [list(order[b[k]:b[k + 1]]) for k in range(len(b) - 1)]


Seq = tuple  # (input_ids, labels): lists or 1-D integer arrays


# What a model's examples need besides their tokens: (positions [n] or [2, n], prompt length or None) of an
# example's ids. Most models count 0, 1, 2 ...; ChatGLM-6B has 2D positions and a prefix mask
# (modeling_chatglm1.example_positions).
Positions = Callable[[np.ndarray], tuple[np.ndarray, int | None]]


def counted(ids: np.ndarray) -> tuple[np.ndarray, None]:
    return np.arange(len(ids), dtype=np.int64), None


def packed_rows(seqs: list[Seq], max_tokens: int, positions: Positions = counted) -> Batch:
    """One packed row of `seqs` (each cut to the budget), positions restarting per example."""
    ids, pos, tgt, lengths, prefixes = [], [], [], [], []
    for input_ids, labels in seqs:
        n = min(len(input_ids), max_tokens)
        ids.append(np.asarray(input_ids[:n], dtype=np.int64))
        p, prefix = positions(ids[-1])
        pos.append(p)
        prefixes.append(prefix)
        tgt.append(shifted_targets(labels)[:n])
        lengths.append(n)
    t = lambda parts: torch.from_numpy(np.concatenate(parts, axis=-1))[None]  # noqa: E731
    flat = np.concatenate(tgt)
    supervised = np.flatnonzero(flat != IGNORE)
    prefix_lens = None if prefixes[0] is None else torch.tensor(prefixes, dtype=torch.int32)
    return Batch(t(ids), t(pos), t(tgt), None, sum(lengths), len(supervised), cu_seqlens(lengths), max(lengths),
                 torch.from_numpy(supervised), prefix_lens, _sequence_of([x != IGNORE for x in tgt]), len(seqs))


def _sequence_of(supervised_masks: list[np.ndarray]) -> torch.Tensor:
    counts = [int(m.sum()) for m in supervised_masks]
    return torch.from_numpy(np.repeat(np.arange(len(counts), dtype=np.int64), counts))


def padded_rows(seqs: list[Seq], pad_id: int) -> Batch:
    """Right-padded rows with an attention mask (the seed's way; `--packing false`)."""
    length = max(len(x) for x, _ in seqs)
    ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    pos = np.zeros((len(seqs), length), dtype=np.int64)
    tgt = np.full((len(seqs), length), IGNORE, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for r, (input_ids, labels) in enumerate(seqs):
        n = len(input_ids)
        ids[r, :n], pos[r, :n], tgt[r, :n], mask[r, :n] = input_ids, np.arange(n), shifted_targets(labels), 1
    t = torch.from_numpy
    supervised = np.flatnonzero(tgt.reshape(-1) != IGNORE)
    return Batch(t(ids), t(pos), t(tgt), t(mask), int(mask.sum()), len(supervised), supervised=t(supervised),
                 sequence_of=_sequence_of(list(tgt != IGNORE)), num_sequences=len(seqs))


def packed_batch(examples: list[Encoded], row: list[int], max_tokens: int, positions: Positions = counted) -> Batch:
    return packed_rows([(examples[i].input_ids, examples[i].labels) for i in row], max_tokens, positions)


def padded_batch(examples: list[Encoded], group: list[int], pad_id: int) -> Batch:
    return padded_rows([(examples[i].input_ids, examples[i].labels) for i in group], pad_id)
