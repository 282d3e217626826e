"""Scoring tool calls: the model's first move after a question (a call, or a plain reply) against the record's.

For every record with tools, the reference is the first step of its answer: a call (name and arguments) or a
reply. A model's reply is read with the family's own parser (common/tools.py), or taken from the server's
`tool_calls`. Scores (x100, as the text scores):

  tool_name_accuracy     of the records that call: the model called, and the right function
  tool_arguments_exact   of the records that call: the right function with JSON-equal arguments
  tool_missed_calls      of the records that call: the model gave no call (or one that did not parse)
  tool_spurious_calls    of the records that reply in text: the model called a function anyway
  tool_malformed_calls   of all tool records: replies that started like a call and did not parse
"""

from __future__ import annotations

from dataclasses import dataclass

from common.data import Conversation
from common.tools import BadToolCall, ToolCall, tool_format

TOOL_SCORES = ("tool_name_accuracy", "tool_arguments_exact", "tool_missed_calls", "tool_spurious_calls",
               "tool_malformed_calls")


@dataclass(frozen=True)
class Malformed:
    """A reply that started like a call but did not parse."""

    text: str


Reply = str | ToolCall | Malformed


def expected_call(conv: Conversation) -> ToolCall | None:
    """The call the record makes first after its question (None: it replies in text)."""
    first = conv.answer[0] if isinstance(conv.answer, list) and conv.answer else None
    if first is not None and "call" in first:
        return ToolCall(first["call"]["name"], first["call"]["arguments"])
    return None


def read_reply(template: str, raw: str) -> Reply:
    """A reply as generated after `<|assistant|>` (metadata line included) → a call, plain text, or malformed."""
    fmt = tool_format(template)
    if fmt is None:
        return raw
    try:
        call = fmt.parse(raw)
    except BadToolCall:
        return Malformed(raw)
    return call if call is not None else raw[1:]


def reply_text(reply: Reply) -> str:
    """What the text scores see of a reply."""
    if isinstance(reply, ToolCall):
        return f"{reply.name}({reply.arguments_json()})"
    return reply.text if isinstance(reply, Malformed) else reply


def reference_text(conv: Conversation) -> str:
    """What a reply is scored against by the text scores: the first step of a tool record's answer."""
    if not isinstance(conv.answer, list):
        return conv.answer or ""
    call = expected_call(conv)
    return reply_text(call) if call is not None else next((s["reply"] for s in conv.answer if "reply" in s), "")


def scored_texts(template: str, convs: list[Conversation], raw: list[str]) -> list[str]:
    """Replies generated raw (metadata line kept) as the text scores see them: a tool record's call as
    `name({arguments})`, like its reference; any other reply as a user sees it."""
    from common.templates import get_template

    clean = get_template(template).clean_reply
    return [reply_text(read_reply(template, r)) if c.tools else clean(r) for c, r in zip(convs, raw)]


def tool_scores(convs: list[Conversation], replies: list[Reply]) -> dict[str, float]:
    """The means above over the records with tools (empty when none has tools)."""
    calls = names = exact = missed = texts = spurious = malformed = seen = 0
    for conv, reply in zip(convs, replies):
        if not conv.tools:
            continue
        seen += 1
        malformed += isinstance(reply, Malformed)
        want = expected_call(conv)
        if want is None:
            texts += 1
            spurious += isinstance(reply, ToolCall)
            continue
        calls += 1
        if not isinstance(reply, ToolCall):
            missed += 1
        elif reply.name == want.name:
            names += 1
            exact += reply.arguments == want.arguments  # dict equality: JSON-equal, key order aside
    if not seen:
        return {}

    def pct(a: int, b: int) -> float:
        return 100.0 * a / b if b else 0.0

    return {"tool_name_accuracy": pct(names, calls), "tool_arguments_exact": pct(exact, calls),
            "tool_missed_calls": pct(missed, calls), "tool_spurious_calls": pct(spurious, texts),
            "tool_malformed_calls": pct(malformed, seen)}
