"""Instruction data: load, validate every record, split, hash.

A record is `{"instruction": str, "input": str (optional), "output": str,
"history": [[question, answer], ...] (optional)}`, the format of the Chinese guanaco/belle sets.
Records become `Conversation`s; the chat templates (common/templates.py) turn those into ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError

MAX_REPORTED = 5  # problems listed in full before "... and N more"


# An answer is plain text or, with tools, steps: {"call": {"name", "arguments"}}, {"observation": text},
# {"reply": text} (common/tools.py renders and parses them per family).
Answer = str | list[dict[str, Any]]


@dataclass
class Conversation:
    """Earlier (question, answer) turns, then the current question and (for training) its answer.

    With tools: `tools` holds the function specs; `pending` the current round's steps so far (the server's
    prompt after a tool result: the model answers what follows them)."""

    history: list[tuple[str, Answer]]
    query: str
    answer: Answer | None = None
    system: str | None = None
    tools: list[dict[str, Any]] | None = None
    pending: list[dict[str, Any]] = field(default_factory=list)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools or self.pending or not isinstance(self.answer, (str, type(None)))
                    or any(not isinstance(a, str) for _, a in self.history))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Conversation:
        """From its JSON form (the data cache, checkpoint metadata, the server's requests)."""
        return cls(history=[tuple(h) for h in d.get("history") or []], query=d["query"], answer=d.get("answer"),
                   system=d.get("system"), tools=d.get("tools"), pending=list(d.get("pending") or []))

    def to_dict(self) -> dict[str, Any]:
        d = {"history": self.history, "query": self.query, "answer": self.answer, "system": self.system}
        if self.tools:
            d["tools"] = self.tools
        if self.pending:
            d["pending"] = self.pending
        return d


def answer_text(answer: Answer | None) -> str:
    """An answer as text: steps become their replies and calls (for scores, corpora, tables)."""
    if answer is None or isinstance(answer, str):
        return answer or ""
    parts = []
    for step in answer:
        if "reply" in step:
            parts.append(step["reply"])
        elif "call" in step:
            parts.append(f"{step['call']['name']}({json.dumps(step['call']['arguments'], ensure_ascii=False)})")
    return "\n".join(parts)


@dataclass
class Problem:
    index: int  # 0-based record index within its file
    field: str  # a field name, "<record>" (the record as a whole) or "<json>" (a JSONL line that does not parse)
    expected: str
    found: str
    line: int = 0  # JSONL: the 1-based line of the record (0: lines mean nothing for this file)

    def describe(self, source: str) -> str:
        if self.field == "<json>":
            return f"{source}: line {self.line} is not valid JSON ({self.found}) (record {self.index})"
        where = f"record {self.index}" + (f" (line {self.line})" if self.line else "")
        what = f", field {self.field!r}" if self.field != "<record>" else ""
        return f"{source}: {where}{what}: expected {self.expected}, found {self.found}"

    def reason(self) -> str:
        """What went wrong, without where: the key of the counts by reason."""
        return "not valid JSON" if self.field == "<json>" else f"{self.field}: expected {self.expected}"


@dataclass
class Dataset:
    source: str
    records: list[dict[str, Any]]
    skipped: list[Problem] = field(default_factory=list)

    def conversations(self) -> list[Conversation]:
        return [record_to_conversation(r) for r in self.records]


def record_to_conversation(record: dict[str, Any]) -> Conversation:
    """Instruction and input are joined with a newline (the seed joined them with nothing). OpenAI-style
    `messages` and sharegpt `conversations` records go through common/chat_records.py."""
    from common.chat_records import chat_conversation, chat_kind

    if chat_kind(record):
        return chat_conversation(record)
    query = record["instruction"]
    if record.get("input"):
        query = f"{query}\n{record['input']}"
    history = [(q, a) for q, a in record.get("history") or []]
    return Conversation(history=history, query=query, answer=record["output"], system=record.get("system"))


def _describe_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return "an empty string" if not v.strip() else f"the string {v[:40]!r}"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, list):
        return f"a list of {len(v)} item(s)"
    if isinstance(v, dict):
        return f"an object with keys {sorted(v)[:5]}"
    return type(v).__name__


def check_record(index: int, record: Any) -> list[Problem]:
    """Every problem with one record (empty list: the record is fine)."""
    if not isinstance(record, dict):
        return [Problem(index, "<record>", "an object with instruction/input/output/history", _describe_value(record))]
    from common.chat_records import RecordError, chat_conversation, chat_kind

    if chat_kind(record):
        try:
            chat_conversation(record)
        except RecordError as err:
            return [Problem(index, err.field, err.expected, err.found)]
        return []
    out: list[Problem] = []
    for name in ("instruction", "output"):
        if name == "output" and "output" not in record and "chosen" in record:
            out.append(Problem(index, name, "a non-empty string (a record with chosen and rejected answers is a "
                               "preference pair: train on those with --stage dpo)", "no such field"))
        elif name not in record:
            out.append(Problem(index, name, "a non-empty string", "no such field"))
        elif not isinstance(record[name], str) or not record[name].strip():
            out.append(Problem(index, name, "a non-empty string", _describe_value(record[name])))
    if "input" in record and record["input"] is not None and not isinstance(record["input"], str):
        out.append(Problem(index, "input", "a string (or no field)", _describe_value(record["input"])))
    if "system" in record and record["system"] is not None and not isinstance(record["system"], str):
        out.append(Problem(index, "system", "a string (or no field)", _describe_value(record["system"])))
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            out.append(Problem(index, "history", "a list of [question, answer] pairs", _describe_value(history)))
        else:
            for j, turn in enumerate(history):
                if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                        or not all(isinstance(x, str) for x in turn)):
                    out.append(Problem(index, f"history[{j}]", "a [question, answer] pair of strings",
                                       _describe_value(turn)))
                    break
    return out


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} (line {line}). "
            "Save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 in.json > out.json`)."
        ) from None
    return text.lstrip("\ufeff")  # a UTF-8 BOM is harmless; drop it


def _load_json(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from None
    if isinstance(data, dict):
        # A common shape: {"data": [...]} or a single record.
        lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        hint = f" (it has a list under {lists[0]!r}; pass that list as the file)" if lists else ""
        raise DataError(f"{path}: expected a JSON list of records, found an object{hint}.")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found {_describe_value(data)}.")
    return data


def _load_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno} is not valid JSON (column {err.colno}: {err.msg}).") from None
    return records


def _load_hf(spec: str) -> list[Any]:
    import datasets

    try:
        if Path(spec).is_dir():
            ds = datasets.load_from_disk(spec)
        else:
            ds = datasets.load_dataset(spec)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs the cause
        raise DataError(
            f"{spec}: cannot load as a JSON/JSONL file, a saved `datasets` folder or a hub dataset: "
            f"{type(err).__name__}: {err}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{spec}: the dataset has splits {list(ds)}, none named 'train'.")
        ds = ds["train"]
    return ds.to_list()


def load_records(spec: str) -> list[Any]:
    """Raw records from a JSON list, JSONL, a `datasets` folder or a hub dataset name."""
    path = Path(spec)
    if path.is_file():
        text = _read_text(path)
        if not text.strip():
            raise DataError(f"{path}: the file is empty. Expected a JSON list of records.")
        is_jsonl = path.suffix == ".jsonl" or (path.suffix != ".json" and text.lstrip().startswith("{"))
        records = _load_jsonl(path, text) if is_jsonl else _load_json(path, text)
    elif path.is_dir() or ("/" in spec and not spec.startswith((".", "/")) and not path.suffix):
        records = _load_hf(spec)
    else:
        raise DataError(f"{spec}: no such file. Pass --data_path a JSON/JSONL file, a saved `datasets` folder "
                        "or a hub dataset name.")
    if not records:
        raise DataError(f"{spec}: holds no records. Expected a list of "
                        '{"instruction", "input", "output", "history"} records.')
    return records


def load_dataset(spec: str, skip_invalid: bool = False,
                 fix: str = "Fix them, or pass --skip_invalid_records to drop them.") -> Dataset:
    """Load and validate; stop on the first bad records unless `skip_invalid` drops them (`fix`: what the
    error tells the user to do)."""
    raw = load_records(spec)
    good: list[dict[str, Any]] = []
    problems: list[Problem] = []
    bad = 0
    for i, rec in enumerate(raw):
        ps = check_record(i, rec)
        if ps:
            bad += 1
            problems.extend(ps)
        else:
            good.append(rec)
    if problems and not skip_invalid:
        shown = "\n".join(f"  - {p.describe(spec)}" for p in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more problem(s)" if len(problems) > MAX_REPORTED else ""
        raise DataError(
            f"{spec}: {bad} of {len(raw)} record(s) are invalid:\n{shown}{more}\n{fix}"
        )
    if not good:
        raise DataError(f"{spec}: all {len(raw)} record(s) are invalid; nothing left to train on.")
    return Dataset(source=spec, records=good, skipped=problems)


def eval_size(n: int, eval_ratio: float, max_eval: int | None = None) -> int:
    """How many of `n` examples are held out: the ratio, at least one, never all, at most `max_eval`."""
    if eval_ratio <= 0 or n < 2:
        return 0
    k = min(n - 1, max(1, round(n * eval_ratio)))
    return min(k, max_eval) if max_eval else k


def sample_positions(n: int, k: int, seed: int) -> np.ndarray:
    """`k` of the positions 0..n-1, chosen by `seed` (sorted): the one rule behind every held-out split."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def split(records: list[dict[str, Any]], eval_ratio: float, seed: int) -> tuple[list, list]:
    """Deterministic train/eval split: the same data, ratio and seed always give the same split."""
    n_eval = eval_size(len(records), eval_ratio)
    if not n_eval:
        return list(records), []
    eval_idx = set(sample_positions(len(records), n_eval, seed).tolist())
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    held = [r for i, r in enumerate(records) if i in eval_idx]
    return train, held


def content_hash(records: list[dict[str, Any]]) -> str:
    """sha256 over the canonical JSON of the records, in order: the dataset's identity in lineage."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]
