"""KV reuse between turns: a finished sequence's cache stays in its slot, found again by its tokens.

A chat client resends the whole conversation every turn, so turn k's prompt starts with turn k - 1's prompt and
reply. When a request ends, its slot is not emptied: the slot, the tokens whose keys and values it holds and the
adapter they were computed with are kept here, least recently used first. A new request whose prompt starts
with those tokens takes that slot and prefills only the rest; a request that matches nothing takes a free slot,
or, when there is none, the least recently used kept one (its cache is overwritten).

Prompts are indexed by chained hashes of their 32-token blocks, so a lookup costs one hash per block of the
prompt, not a comparison with every kept sequence; the match is then extended token by token past its last
whole block. Only runners whose cache at a position depends on the tokens before it alone can reuse it
(`Runner.reuses_prefixes`: not ChatGLM-6B, whose prompt tokens see the whole prompt).
"""

from __future__ import annotations

import collections

import numpy as np

BLOCK = 32  # tokens per hashed block; a shared prefix shorter than one block is not looked for


def _block_hashes(tokens: np.ndarray) -> list[int]:
    """hash of tokens[:32], of tokens[:64], ... (whole blocks only), each chained from the one before."""
    out, h = [], 0
    for i in range(len(tokens) // BLOCK):
        h = hash((h, tokens[i * BLOCK:(i + 1) * BLOCK].tobytes()))
        out.append(h)
    return out


class PrefixCache:
    def __init__(self) -> None:
        self._kept: collections.OrderedDict[int, tuple[object, np.ndarray, list[int]]] = collections.OrderedDict()
        self._index: dict[tuple[object, int], set[int]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, slot: int, key: object, tokens: list[int]) -> None:
        """`slot` holds the keys and values of `tokens` (computed with adapter `key`) and is free to take."""
        arr = np.asarray(tokens, dtype=np.int64)
        hashes = _block_hashes(arr)
        self._kept[slot] = (key, arr, hashes)
        for h in hashes:
            self._index.setdefault((key, h), set()).add(slot)

    def take(self, slot: int) -> None:
        """`slot` is reused: forget what it held."""
        key, _, hashes = self._kept.pop(slot)
        for h in hashes:
            slots = self._index.get((key, h))
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._index[(key, h)]

    def oldest(self) -> int:
        """The least recently kept slot (the one to overwrite when no slot is free)."""
        return next(iter(self._kept))

    def match(self, key: object, prompt: list[int]) -> tuple[int | None, int]:
        """(slot, tokens) of the kept sequence sharing the longest prefix with `prompt` (at least one block),
        or (None, 0)."""
        arr = np.asarray(prompt, dtype=np.int64)
        candidates: set[int] = set()
        for h in _block_hashes(arr):
            slots = self._index.get((key, h))
            if not slots:
                break
            candidates = slots
        best, length = None, 0
        for slot in candidates:
            kept = self._kept[slot][1]
            n = min(len(kept), len(arr))
            differ = np.flatnonzero(kept[:n] != arr[:n])
            same = int(differ[0]) if len(differ) else n
            if same > length:
                best, length = slot, same
        return best, length
