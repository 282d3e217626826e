"""A reply to a request with tools, on the model replica: how `tool_choice` steers the start of the reply, and
how the generated text becomes either plain content (streamed as it comes) or one tool call.

The family's format (common/tools.py) decides: a reply whose metadata line is empty is plain text; one that
starts with a function name is a call, held back until it ends (its arguments must parse before the client
sees them) and then sent whole. A call that does not parse goes out as plain content and is counted.

tool_choice   auto       the model decides
              none       the reply starts with the empty metadata line: plain text, never a call
              required   the first token may not be the one that starts plain text
              {"type": "function", "function": {"name": F}}   the reply starts with F's metadata line
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from common.tools import BadToolCall, tool_format

REGISTRY = CollectorRegistry()
CALLS = Counter("glmops_tool_calls", "replies parsed into a tool call", registry=REGISTRY)
PARSE_FAILURES = Counter("glmops_tool_call_parse_failures", "replies that started like a tool call but did not "
                         "parse (sent as plain content)", registry=REGISTRY)


def metrics_text() -> str:
    return generate_latest(REGISTRY).decode()


class PlainReply:
    """A reply without tools: text as a user sees it, streamed as it comes."""

    prefix_ids: tuple[int, ...] = ()
    banned_first: tuple[int, ...] = ()
    finish_reason: str | None = None

    def __init__(self, clean):
        self.clean = clean

    def feed(self, text: str) -> list[dict]:
        return [{"delta": text}] if text else []

    def finish(self) -> list[dict]:
        return []


def reply_for(template, tok, conv: dict) -> PlainReply | ToolReply:
    """How the replica shapes a request's reply: ToolReply for a request with tools (and a template with a tool
    format; otherwise the prompt refuses it), else PlainReply with the template's clean-up."""
    if not conv.get("tools") or tool_format(template.name) is None:
        return PlainReply(template.clean_reply)
    return ToolReply(template, tok, conv.get("tool_choice") or "auto")


class ToolReply:
    def __init__(self, template, tok, choice):
        from common.templates import _enc

        self.format = tool_format(template.name)
        self.named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        self.plain = choice == "none"
        # What the prompt is extended with: the reply's forced start.
        self.forced = f"{self.named}\n" if self.named else ("\n" if self.plain else "")
        self.prefix_ids = _enc(tok, self.forced) if self.forced else []
        newline = _enc(tok, "\n")
        self.banned_first = tuple(sorted({newline[0], newline[-1]})) if choice == "required" else ()
        self.raw = ""
        self.mode = "text" if self.plain else ("call" if self.named else None)
        self.finish_reason: str | None = None

    @staticmethod
    def clean(text: str) -> str:
        """The detokenizer keeps the metadata line: feed() reads it."""
        return text

    def feed(self, text: str) -> list[dict]:
        """Chunks for the client after `text` more of the raw reply (what follows the forced start)."""
        self.raw += text
        if self.mode is None and self.raw:
            self.mode = "text" if self.raw.startswith("\n") else "call"
            if self.mode == "text":
                text = self.raw[1:]  # the empty metadata line
        if self.mode == "text" and text:
            return [{"delta": text}]
        return []

    def finish(self) -> list[dict]:
        """At the reply's end: the call, or what was held back as plain content."""
        if self.mode != "call":
            return []
        text = self.forced + self.raw  # starts with a function name: parse gives a call or raises
        try:
            call = self.format.parse(text)
        except BadToolCall:
            PARSE_FAILURES.inc()
            return [{"delta": text}]
        CALLS.inc()
        self.finish_reason = "tool_calls"
        return [{"tool_call": {"name": call.name, "arguments": call.arguments_json()}}]
