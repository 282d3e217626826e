"""The order of training: which examples make which micro-batch, epoch by epoch, on every worker.

An epoch's plan is computed from small per-example columns only (token count, supervised count, which
stored part holds it), so every worker computes the same plan for the whole epoch without holding the
examples themselves:

1. the stored parts (a few thousand examples each) are shuffled with (seed, epoch);
2. consecutive parts form windows of at most `window_examples` examples;
3. inside a window the examples are shuffled, then packed greedily into rows under the token budget
   (or grouped `batch_size` at a time for padded batches);
4. micro-batch b of the epoch goes to worker b mod world within its optimizer step (steps take
   `world x accumulation` consecutive micro-batches; an epoch's last step may take fewer).

A worker then reads the tokens of one window at a time (`BatchReader`): memory is bounded by the
window, not by the data. The plan depends only on (data, seed, epoch, budget), so a resumed or restored
worker recomputes it and continues at the exact micro-batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from common.templates import IGNORE
from common.training.packing import Batch, Positions, counted, greedy_rows, packed_rows, padded_rows

# Examples shuffled together; a worker holds about two windows of tokens (tests lower it).
WINDOW_EXAMPLES = int(os.environ.get("GLMOPS_WINDOW_EXAMPLES", "32768"))


@dataclass
class Part:
    """The tokens of one stored part: flat ids/labels with per-row offsets (zero-copy from Arrow).

    `chosen_tokens`: preference pairs, where each row's chosen sequence ends (the rest is the rejected one)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    chosen_tokens: np.ndarray | None = None

    def example(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[row], self.offsets[row + 1]
        return self.ids[a:b], self.labels[a:b]

    def sequences(self, row: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The sequences a row trains as: itself, or a pair's chosen then rejected sequence (kept together in one
        micro-batch, each attending only to itself)."""
        ids, labels = self.example(row)
        if self.chosen_tokens is None:
            return [(ids, labels)]
        c = int(self.chosen_tokens[row])
        return [(ids[:c], labels[:c]), (ids[c:], labels[c:])]


class ExampleSource:
    """Examples in parts. `ids` (the record ids), `num_tokens`, `num_targets`, `part` (which part holds
    it) and `row` (its row there) are per-example arrays. `pairs`: each example is a preference pair."""

    ids: np.ndarray
    num_tokens: np.ndarray
    num_targets: np.ndarray
    part: np.ndarray
    row: np.ndarray
    n_parts: int
    pairs: bool = False

    def __len__(self) -> int:
        return len(self.num_tokens)

    @property
    def units(self) -> np.ndarray:
        """What a step's loss is averaged over, per example: its supervised tokens, or one per pair."""
        return np.ones_like(self.num_targets) if self.pairs else self.num_targets

    def load_part(self, p: int) -> Part:
        raise NotImplementedError


class InMemoryExamples(ExampleSource):
    """A list of encoded examples (tests, benchmarks, small eval sets) as one part."""

    def __init__(self, examples):
        lengths = [len(e.input_ids) for e in examples]
        self.num_tokens = np.asarray(lengths, dtype=np.int64)
        self.num_targets = np.asarray([sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples], dtype=np.int64)
        self.part = np.zeros(len(examples), dtype=np.int64)
        self.row = self.ids = np.arange(len(examples))
        self.n_parts = 1
        self.pairs = bool(examples) and "chosen_tokens" in getattr(examples[0], "meta", {})
        if self.pairs:
            self.num_targets = np.asarray([e.meta["targets"] for e in examples], dtype=np.int64)
        flat = lambda key: np.asarray([x for e in examples for x in getattr(e, key)], dtype=np.int64)  # noqa: E731
        self._part = Part(flat("input_ids"), flat("labels"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                          np.asarray([e.meta["chosen_tokens"] for e in examples]) if self.pairs else None)

    def load_part(self, p: int) -> Part:
        return self._part


class ParquetExamples(ExampleSource):
    """Examples stored by common.training.tokenize_cache: one Parquet file per part.

    `exclude` drops ids (the held-out eval examples when they come from the same files)."""

    def __init__(self, files: list[str], exclude: np.ndarray | None = None):
        import pyarrow.parquet as pq

        self.files = list(files)
        self.pairs = bool(self.files) and "chosen_tokens" in pq.read_schema(self.files[0]).names
        cols: dict[str, list[np.ndarray]] = {"ids": [], "num_tokens": [], "num_targets": [], "part": [], "row": []}
        for p, f in enumerate(self.files):
            t = pq.read_table(f, columns=["id", "num_tokens", "num_targets"])
            ids = t["id"].to_numpy()
            keep = np.ones(len(ids), bool) if exclude is None or not len(exclude) else ~np.isin(ids, exclude)
            cols["ids"].append(ids[keep])
            cols["num_tokens"].append(t["num_tokens"].to_numpy()[keep].astype(np.int64))
            cols["num_targets"].append(t["num_targets"].to_numpy()[keep].astype(np.int64))
            cols["part"].append(np.full(int(keep.sum()), p, dtype=np.int64))
            cols["row"].append(np.nonzero(keep)[0])
        for k, v in cols.items():
            setattr(self, k, np.concatenate(v) if v else np.zeros(0, dtype=np.int64))
        self.n_parts = len(self.files)

    def load_part(self, p: int) -> Part:
        import pyarrow.parquet as pq

        t = pq.read_table(self.files[p], columns=["input_ids", "labels"] + (["chosen_tokens"] if self.pairs else []))
        ids, labels = t["input_ids"].combine_chunks(), t["labels"].combine_chunks()
        return Part(ids.values.to_numpy(), labels.values.to_numpy(), ids.offsets.to_numpy(),
                    t["chosen_tokens"].to_numpy() if self.pairs else None)


@dataclass
class EpochPlan:
    order: np.ndarray      # example indices in epoch order
    bounds: np.ndarray     # micro-batch b is order[bounds[b]:bounds[b + 1]]
    window_of: np.ndarray  # the window of each micro-batch
    windows: list[list[int]]  # the parts of each window
    targets: np.ndarray    # loss units per micro-batch: supervised tokens, or preference pairs
    tokens: np.ndarray     # real tokens per micro-batch (truncated to the budget)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def examples(self, b: int) -> np.ndarray:
        return self.order[self.bounds[b]:self.bounds[b + 1]]


def plan_epoch(src: ExampleSource, *, epoch: int, seed: int, packing: bool, max_tokens: int, batch_size: int,
               window_examples: int = WINDOW_EXAMPLES) -> EpochPlan:
    rng = np.random.default_rng([seed, epoch])
    counts = np.bincount(src.part, minlength=src.n_parts)
    by_part = np.argsort(src.part, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    windows: list[list[int]] = []
    current, n = [], 0
    for p in rng.permutation(src.n_parts).tolist():
        if counts[p] == 0:
            continue
        if current and n + counts[p] > window_examples:
            windows.append(current)
            current, n = [], 0
        current.append(p)
        n += counts[p]
    if current:
        windows.append(current)
    order, bounds, window_of = [], [0], []
    offset = 0
    for w, parts in enumerate(windows):
        ex = np.concatenate([by_part[starts[p]:starts[p + 1]] for p in parts])
        ex = ex[rng.permutation(len(ex))]
        lengths = np.minimum(src.num_tokens[ex], max_tokens)
        local = greedy_rows(lengths.tolist(), max_tokens) if packing else \
            list(range(0, len(ex), batch_size)) + [len(ex)]
        order.append(ex)
        bounds += [offset + b for b in local[1:]]
        window_of += [w] * (len(local) - 1)
        offset += len(ex)
    order_arr = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    bounds_arr = np.asarray(bounds, dtype=np.int64)
    clipped = np.minimum(src.num_tokens[order_arr], max_tokens) if packing else src.num_tokens[order_arr]
    per_mb = lambda x: np.add.reduceat(x, bounds_arr[:-1]) if len(order_arr) else np.zeros(0, np.int64)  # noqa: E731
    return EpochPlan(order_arr, bounds_arr, np.asarray(window_of, dtype=np.int64), windows,
                     per_mb(src.units[order_arr]), per_mb(clipped))


@dataclass
class BatchFit:
    """The batching chosen for a dataset, and the epoch plan it makes."""

    max_tokens: int
    accumulation: int
    plan: EpochPlan
    steps_per_epoch: int


def _halvings(start: int, floor: int) -> list[int]:
    """start, start / 2, ... down to floor (which ends the list)."""
    out = [start]
    while out[-1] // 2 >= floor:
        out.append(out[-1] // 2)
    return out + ([floor] if out[-1] > floor else [])


def fit_batching(src: ExampleSource, *, packing: bool, workers: int, batch_size: int, seed: int,
                 max_tokens: int | None, accumulation: int | None, large_tokens: int, large_accumulation: int,
                 min_steps: int) -> BatchFit:
    """The largest batching whose epoch holds at least `min_steps` optimizer steps.

    A setting that is given stays. One left unset starts at its large-data value and halves: the
    accumulation first (a full micro-batch keeps the GPU busy; fewer of them per step only means more
    steps), then the token budget, never below the longest example (rows would cut it). When even the
    smallest batching makes fewer steps (a handful of records), that smallest one is chosen."""
    longest = int(src.num_tokens.max()) if len(src) else 1
    tokens = [max_tokens] if max_tokens else _halvings(large_tokens, -(-longest // 16) * 16)
    accums = [accumulation] if accumulation else _halvings(large_accumulation, 1)
    candidates = [(tokens[0], a) for a in accums]
    if packing:  # padded batches (--packing false) hold one example count whatever the budget
        candidates += [(t, accums[-1]) for t in tokens[1:]]
    for t, a in candidates:
        plan = plan_epoch(src, epoch=0, seed=seed, packing=packing, max_tokens=t, batch_size=batch_size)
        steps = steps_in(plan, workers * a)
        if steps >= min_steps:
            break
    return BatchFit(t, a, plan, steps)


def steps_in(plan: EpochPlan, per_step: int) -> int:
    return -(-len(plan) // per_step)


def step_micro_batches(plan: EpochPlan, step: int, per_step: int) -> range:
    return range(step * per_step, min((step + 1) * per_step, len(plan)))


class BatchReader:
    """Builds micro-batches of a plan, reading the parts of at most two windows at a time."""

    def __init__(self, src: ExampleSource, plan: EpochPlan, *, packing: bool, max_tokens: int, pad_id: int,
                 positions: Positions = counted):
        self.src, self.plan = src, plan
        self.packing, self.max_tokens, self.pad_id, self.positions = packing, max_tokens, pad_id, positions
        self.loaded: dict[int, Part] = {}

    def _parts_for(self, w: int) -> None:
        keep = set(self.plan.windows[w]) | (set(self.plan.windows[w - 1]) if w > 0 else set())
        for p in [p for p in self.loaded if p not in keep]:
            del self.loaded[p]
        for p in self.plan.windows[w]:
            if p not in self.loaded:
                self.loaded[p] = self.src.load_part(p)

    def batch(self, b: int) -> Batch:
        self._parts_for(int(self.plan.window_of[b]))
        ex = self.plan.examples(b)
        seqs = [s for i in ex for s in self.loaded[int(self.src.part[i])].sequences(int(self.src.row[i]))]
        batch = packed_rows(seqs, self.max_tokens, self.positions) if self.packing else padded_rows(seqs, self.pad_id)
        batch.examples = ex
        return batch


def all_batches(src: ExampleSource, *, epoch: int, seed: int, packing: bool, max_tokens: int, batch_size: int,
                pad_id: int, positions: Positions = counted) -> list[Batch]:
    """Every micro-batch of one epoch, in order (small sets: eval, tests, benchmarks)."""
    plan = plan_epoch(src, epoch=epoch, seed=seed, packing=packing, max_tokens=max_tokens, batch_size=batch_size)
    reader = BatchReader(src, plan, packing=packing, max_tokens=max_tokens, pad_id=pad_id, positions=positions)
    return [reader.batch(b) for b in range(len(plan))]


def epoch_batches(examples, **kw) -> list[Batch]:
    """`all_batches` of a list of encoded examples."""
    return all_batches(InMemoryExamples(examples), **kw)
