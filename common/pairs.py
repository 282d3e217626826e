"""Preference data: one prompt with a chosen and a rejected answer, validated with the same named problems as
instruction records (common/data.py) and turned into two `Conversation`s that share everything but the answer.

Two shapes:

    seed style:  {"instruction": str, "input"?: str, "history"?: [[q, a], ...], "system"?: str,
                  "chosen": str, "rejected": str}
    OpenAI:      {"messages": [system?, user, assistant, ..., user], "tools"?: [...],
                  "chosen": {"role": "assistant", "content": str} (or a list holding that one message, or a
                  plain string), "rejected": the same}
"""

from __future__ import annotations

from typing import Any

from common.data import Conversation, Problem, _describe_value, check_record

ANSWERS = ("chosen", "rejected")


class PairError(ValueError):
    def __init__(self, field: str, expected: str, found: str):
        super().__init__(f"{field}: expected {expected}, found {found}")
        self.field, self.expected, self.found = field, expected, found


def _answer(record: dict, key: str) -> str:
    """The text of `chosen` / `rejected` in either shape."""
    if key not in record:
        raise PairError(key, "a non-empty answer (string, or an assistant message)", "no such field")
    value = record[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise PairError(f"{key}.role", "assistant", repr(value.get("role")))
        if value.get("tool_calls"):
            raise PairError(f"{key}.tool_calls", "a plain reply (preference pairs over tool calls are not supported)",
                            "tool calls")
        value = value.get("content")
        key = f"{key}.content"
    if not isinstance(value, str) or not value.strip():
        raise PairError(key, "a non-empty string", _describe_value(value))
    return value


def pair_problems(index: int, record: Any) -> list[Problem]:
    """Every problem with one preference record (empty: the record is fine)."""
    if not isinstance(record, dict):
        return [Problem(index, "<record>", "an object with a prompt, chosen and rejected", _describe_value(record))]
    found: list[Problem] = []
    texts = {}
    for key in ANSWERS:
        try:
            texts[key] = _answer(record, key)
        except PairError as err:
            found.append(Problem(index, err.field, err.expected, err.found))
    if len(texts) == 2 and texts["chosen"].strip() == texts["rejected"].strip():
        found.append(Problem(index, "rejected", "an answer different from chosen", "the same text as chosen"))
    if "output" in record:
        found.append(Problem(index, "output", "no output in a preference record (its answers are chosen and "
                             "rejected; instruction records train with --stage sft)", "an output field"))
    try:
        _prompt(record, "-")
    except PairError as err:
        found.append(Problem(index, err.field, err.expected, err.found))
    except _PromptProblems as err:
        found += [Problem(index, p.field, p.expected, p.found) for p in err.problems]
    return found


class _PromptProblems(ValueError):
    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(f"{p.field}: {p.expected}" for p in problems))
        self.problems = problems


def _prompt(record: dict, answer: str) -> Conversation:
    """The conversation of the record's prompt answered by `answer`."""
    from common.chat_records import RecordError, messages_conversation

    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise PairError("messages", "a non-empty list of messages ending with the user's", _describe_value(messages))
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            raise PairError(f"messages[{len(messages) - 1}].role", "user (the prompt the two answers reply to)",
                            repr(last.get("role")) if isinstance(last, dict) else _describe_value(last))
        try:
            return messages_conversation({**record, "messages": [*messages, {"role": "assistant",
                                                                             "content": answer}]})
        except RecordError as err:
            raise PairError(err.field, err.expected, err.found) from None
    if "conversations" in record:
        raise PairError("conversations", "seed-style fields or OpenAI messages (sharegpt preference records are "
                        "not supported)", "a conversations field")
    problems = check_record(0, {**{k: v for k, v in record.items() if k not in ANSWERS}, "output": answer})
    if problems:
        raise _PromptProblems(problems)
    query = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    return Conversation(history=[(q, a) for q, a in record.get("history") or []], query=query, answer=answer,
                        system=record.get("system"))


def pair_conversations(record: dict) -> tuple[Conversation, Conversation]:
    """(chosen, rejected) of a record that `pair_problems` passed."""
    return _prompt(record, _answer(record, "chosen")), _prompt(record, _answer(record, "rejected"))
