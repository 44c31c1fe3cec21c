"""One error type for every problem a user can fix (it names the problem and the fix), and its one printer."""

from __future__ import annotations

import os
import sys
from typing import TextIO


class NeedlesError(Exception):
    """A user-facing error. The CLI prints it without a traceback (set NEEDLES_DEBUG=1 for one)."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


def debug() -> bool:
    """NEEDLES_DEBUG=1: let NeedlesError propagate with its traceback."""
    return os.environ.get("NEEDLES_DEBUG") == "1"


def print_error(exc: NeedlesError, file: TextIO | None = None, leading_newline: bool = False) -> None:
    """The one way a NeedlesError reaches a user: ``needles: error: ...`` and, when known, ``  fix: ...``."""
    out = file if file is not None else sys.stderr
    print(f"{chr(10) if leading_newline else ''}needles: error: {exc.problem}", file=out)
    if exc.fix:
        print(f"  fix: {exc.fix}", file=out)
