"""User-facing errors: one clear message, no traceback.

Anything a user can get wrong (a flag, a data file, a model folder) raises `UserError`.
Entry points wrap `main()` in `run_cli`, which prints the message and exits non-zero.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user can fix; `str(err)` is the whole message they see."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in flags or a config file, reported together."""

    def __init__(self, problems: list[str], source: str = "configuration"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the {source}:\n{lines}")


class DataError(UserError):
    """The training data cannot be used as it is."""


class ModelFilesError(UserError):
    """A model folder is missing files or holds the wrong layout."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; user mistakes become a message on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


@dataclass
class MemoryKill:
    """Ray's memory monitor killed processes of a job: where, and how full the node was."""

    node: str          # the node's IP
    used_gb: float
    limit_gb: float
    threshold: float   # the share of the limit above which Ray kills (RAY_memory_usage_threshold)


_NODE_MEMORY = re.compile(r"Memory on the node \(IP: ([^,]+), ID: \w+\).*? was ([\d.]+)GB used / ([\d.]+)GB limit")
_THRESHOLD = re.compile(r"exceeded threshold of \d+B \(([\d.]+)% of")
_FLAGGED = ("running low on memory", "killed due to memory pressure", "OutOfMemoryError")


def _texts(err: BaseException):
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield type(e).__name__ + ": " + str(e)
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)  # Ray Train: {rank: the worker's exception}
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]


def memory_kill(err: BaseException) -> MemoryKill | None:
    """The memory kill behind a failed Ray job, or None when it failed for another reason."""
    for text in _texts(err):
        if not any(flag in text for flag in _FLAGGED):
            continue
        node = _NODE_MEMORY.search(text)
        threshold = _THRESHOLD.search(text)
        return MemoryKill(node.group(1) if node else "?", float(node.group(2)) if node else float("nan"),
                          float(node.group(3)) if node else float("nan"),
                          float(threshold.group(1)) / 100 if threshold else 0.95)
    return None
