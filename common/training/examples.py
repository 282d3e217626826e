"""Records → conversations → (input_ids, labels), with statistics for the dry run and the logs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.data import Conversation, record_to_conversation
from common.templates import IGNORE, Encoded, ExampleTooLong, Template


@dataclass
class EncodedSet:
    examples: list[Encoded]
    too_long: list[int] = field(default_factory=list)  # record indices rejected: question over budget
    dropped_rounds: int = 0
    truncated_answers: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_supervised(self) -> int:
        return sum(sum(1 for x in e.labels if x != IGNORE) for e in self.examples)


def encode_records(records: list[dict], tok, template: Template, max_source_length: int,
                   max_target_length: int, train_on_history: bool = False) -> EncodedSet:
    out = EncodedSet(examples=[])
    for i, rec in enumerate(records):
        conv: Conversation = record_to_conversation(rec)
        try:
            enc = template.encode(tok, conv, max_source_length, max_target_length, train_on_history)
        except ExampleTooLong:
            out.too_long.append(i)
            continue
        out.examples.append(enc)
        out.dropped_rounds += enc.dropped_rounds
        out.truncated_answers += int(enc.answer_truncated)
    return out


def percentile(values, q: float) -> int:
    """The value at rank round(q * (n - 1)) of the sorted values (0 for none)."""
    s = np.sort(np.asarray(values))
    return int(s[min(len(s) - 1, int(round(q * (len(s) - 1))))]) if len(s) else 0


def length_summary(values) -> str:
    values = np.asarray(values)
    if not len(values):
        return "-"
    return (f"min {int(values.min())}, median {percentile(values, 0.5)}, p95 {percentile(values, 0.95)}, "
            f"max {int(values.max())}")
