"""One error type for every problem a user can fix: it names the problem and the fix."""

from __future__ import annotations


class NeedlesError(Exception):
    """A user-facing error. The CLI prints it without a traceback (set NEEDLES_DEBUG=1 for one)."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")
