"""Chat records with tool calls: OpenAI-style `messages` and sharegpt `conversations`, turned into the same
`Conversation` as alpaca records, or into the problems that say which field is wrong and what was expected.

OpenAI style:  {"tools": [...], "messages": [{"role": "system"}?, {"role": "user"}, {"role": "assistant",
               "content": ..., "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]},
               {"role": "tool", "tool_call_id", "content"}, ..., {"role": "assistant"}]}
sharegpt:      {"tools": [...] or a JSON string, "system"?: str, "conversations": [{"from": "human" | "gpt" |
               "function_call" | "observation" | "system", "value": str}, ...]}; a function_call's value is
               JSON {"name", "arguments"}.

Each user message opens a round; what follows it up to the next user message is the round's answer: plain text,
or steps (calls, their results, replies; common/tools.py). The last round is what is learned (every round with
--train_on_history), so the last message must be the assistant's.
"""

from __future__ import annotations

import json
from typing import Any

from common.tools import call_arguments, tool_specs

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "call", "observation": "observation", "system": "system"}


class RecordError(ValueError):
    """One problem with a record: the field, what was expected, what was found."""

    def __init__(self, field: str, expected: str, found: str):
        super().__init__(f"{field}: expected {expected}, found {found}")
        self.field, self.expected, self.found = field, expected, found


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
    if isinstance(value, str) and (allow_empty or value.strip()):
        return value
    if value is None and allow_empty:
        return ""
    from common.data import _describe_value

    raise RecordError(field, "a non-empty string" if not allow_empty else "a string", _describe_value(value))


def _result_text(value: Any) -> str:
    # A tool result may be any JSON value; the models read it as text (THUDM's builders do the same).
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _tools(record: dict) -> list[dict] | None:
    if record.get("tools") in (None, "", []):
        return None
    try:
        return tool_specs(record["tools"])
    except ValueError as err:
        field, _, why = str(err).partition(": ")
        raise RecordError(field, "a list of function tools (name, description, parameters)", why) from None


class _Rounds:
    """Collects (question, steps) rounds and checks the order of turns."""

    def __init__(self, tools: list[dict] | None):
        self.tools = tools
        self.system: str | None = None
        self.rounds: list[tuple[str, list[dict]]] = []
        self.open_calls: list[str] = []  # ids (or names) of calls without a result yet

    def user(self, text: str, field: str) -> None:
        if self.rounds and not self.rounds[-1][1]:
            raise RecordError(field, "an assistant reply before the next user message", "two user messages in a row")
        self.rounds.append((text, []))

    def step(self, step: dict, field: str) -> None:
        if not self.rounds:
            raise RecordError(field, "a user message first", f"{next(iter(step))} before any user message")
        self.rounds[-1][1].append(step)

    def call(self, name: str, args: dict, key: str, field: str, name_field: str) -> None:
        if self.tools is not None and name not in {t["name"] for t in self.tools}:
            raise RecordError(name_field, f"one of the record's tools ({', '.join(t['name'] for t in self.tools)})",
                              repr(name))
        self.step({"call": {"name": name, "arguments": args}}, field)
        self.open_calls.append(key)

    def conversation(self, field: str, prompt: bool = False):
        tools = self.tools
        from common.data import Conversation

        if not self.rounds:
            raise RecordError(field, "at least one user message and the assistant's answer", "none")
        steps = self.rounds[-1][1]
        if prompt:  # the server's side: the model answers what follows the last message
            if steps and "observation" not in steps[-1]:
                raise RecordError(field, "a user message or a tool result last", "an assistant message last")
            history = [(q, _plain(s)) for q, s in self.rounds[:-1]]
            return Conversation(history=history, query=self.rounds[-1][0], system=self.system, tools=tools,
                                pending=steps)
        if not steps or "observation" in steps[-1]:
            raise RecordError(field, "the assistant's message last (the answer to learn)",
                              "a tool result last" if steps else "a user message last")
        history = [(q, _plain(s)) for q, s in self.rounds[:-1]]
        return Conversation(history=history, query=self.rounds[-1][0], answer=_plain(steps), system=self.system,
                            tools=tools)


def _plain(steps: list[dict]) -> str | list[dict]:
    """A round that is one reply stays plain text (as alpaca records)."""
    return steps[0]["reply"] if len(steps) == 1 and "reply" in steps[0] else steps


def messages_conversation(record: dict, prompt: bool = False):
    """The Conversation of an OpenAI-style record (`prompt`: a request to answer, not an example to learn);
    raises RecordError."""
    tools = _tools(record)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError("messages", "a non-empty list of messages", f"{type(messages).__name__}")
    rounds = _Rounds(tools)
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RecordError(at, "an object with role and content", type(m).__name__)
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"{at}.role", "one of system, user, assistant, tool", repr(role))
        if role == "system":
            if i != 0:
                raise RecordError(f"{at}.role", "system only as the first message", f"system at position {i}")
            rounds.system = _text(m.get("content"), f"{at}.content")
        elif role == "user":
            rounds.user(_text(m.get("content"), f"{at}.content"), at)
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            content = _text(m.get("content"), f"{at}.content", allow_empty=bool(calls))
            if content.strip():
                rounds.step({"reply": content}, at)
            if not isinstance(calls, list):
                raise RecordError(f"{at}.tool_calls", "a list of calls", type(calls).__name__)
            for j, call in enumerate(calls):
                cat = f"{at}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict):
                    raise RecordError(f"{cat}.function", "an object with name and arguments", repr(fn)[:40])
                name = _text(fn.get("name"), f"{cat}.function.name")
                try:
                    args = call_arguments(fn.get("arguments", {}), f"{cat}.function.arguments")
                except ValueError as err:
                    raise RecordError(f"{cat}.function.arguments", "a JSON object (or a string holding one)",
                                      str(err).partition(": ")[2]) from None
                rounds.call(name, args, str(call.get("id") or name), at, f"{cat}.function.name")
        else:  # tool
            if not rounds.open_calls:
                raise RecordError(f"{at}.role", "a tool result only after an assistant message with tool_calls",
                                  "a tool message with no call before it")
            key = m.get("tool_call_id")
            if key is not None and str(key) not in rounds.open_calls:
                raise RecordError(f"{at}.tool_call_id", f"the id of a call still waiting ({', '.join(rounds.open_calls)})",
                                  repr(key))
            rounds.open_calls.remove(str(key) if key is not None else rounds.open_calls[0])
            rounds.step({"observation": _result_text(m.get("content", ""))}, at)
    return rounds.conversation("messages", prompt)


def sharegpt_conversation(record: dict):
    """The Conversation of a sharegpt record; raises RecordError."""
    tools = _tools(record)
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("conversations", "a non-empty list of turns", type(turns).__name__)
    rounds = _Rounds(tools)
    if record.get("system"):
        rounds.system = _text(record["system"], "system")
    for i, t in enumerate(turns):
        at = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise RecordError(at, "an object with from and value", type(t).__name__)
        role = SHAREGPT_ROLES.get(t.get("from"))
        if role is None:
            raise RecordError(f"{at}.from", "one of " + ", ".join(SHAREGPT_ROLES), repr(t.get("from")))
        if role == "system":
            if i != 0:
                raise RecordError(f"{at}.from", "system only as the first turn", f"system at position {i}")
            rounds.system = _text(t.get("value"), f"{at}.value")
        elif role == "user":
            rounds.user(_text(t.get("value"), f"{at}.value"), at)
        elif role == "assistant":
            rounds.step({"reply": _text(t.get("value"), f"{at}.value")}, at)
        elif role == "call":
            value = t.get("value")
            try:
                call = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError as err:
                raise RecordError(f"{at}.value", 'JSON {"name": ..., "arguments": {...}}', f"not JSON ({err.msg})") from None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise RecordError(f"{at}.value", 'JSON {"name": ..., "arguments": {...}}', repr(value)[:40])
            try:
                args = call_arguments(call.get("arguments", {}), f"{at}.value.arguments")
            except ValueError as err:
                raise RecordError(f"{at}.value.arguments", "a JSON object", str(err).partition(": ")[2]) from None
            rounds.call(call["name"], args, call["name"], at, f"{at}.value")
        else:  # observation
            if not rounds.open_calls:
                raise RecordError(f"{at}.from", "an observation only after a function_call",
                                  "an observation with no call before it")
            rounds.open_calls.pop(0)
            rounds.step({"observation": _result_text(t.get("value", ""))}, at)
    return rounds.conversation("conversations")


def chat_kind(record: dict) -> str | None:
    """'messages' or 'conversations' for the chat record shapes, None for alpaca records."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "conversations"
    return None


def chat_conversation(record: dict):
    return messages_conversation(record) if chat_kind(record) == "messages" else sharegpt_conversation(record)


def openai_messages(conv) -> list[dict]:
    """A conversation's prompt as OpenAI chat messages (the inverse of `messages_conversation`, answer left out):
    what a client sends to ask for the next reply."""
    out = [{"role": "system", "content": conv.system}] if conv.system else []
    n = 0

    def steps(answer) -> None:
        nonlocal n
        for step in [{"reply": answer}] if isinstance(answer, str) else answer:
            if "reply" in step:
                out.append({"role": "assistant", "content": step["reply"]})
            elif "call" in step:
                n += 1
                out.append({"role": "assistant", "content": None, "tool_calls": [{
                    "id": f"call_{n}", "type": "function", "function": {
                        "name": step["call"]["name"],
                        "arguments": json.dumps(step["call"]["arguments"], ensure_ascii=False)}}]})
            else:
                out.append({"role": "tool", "tool_call_id": f"call_{n}", "content": step["observation"]})

    for q, a in conv.history:
        out.append({"role": "user", "content": q})
        steps(a)
    out.append({"role": "user", "content": conv.query})
    steps(conv.pending)
    return out
