"""User-facing errors: one clear message, no traceback.

Anything a user can get wrong (a flag, a data file, a model folder) raises `UserError`.
Entry points wrap `main()` in `run_cli`, which prints the message and exits non-zero.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


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
