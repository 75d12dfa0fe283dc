"""Errors that end one case, never the run."""

from __future__ import annotations


class RejectedCase(Exception):
    """A case that cannot be used, with a short machine code and a human-readable reason.

    The message is what the ingest summary and `index.csv` show, so it says what is wrong
    and, where possible, what to do; it never contains PHI (no names, UIDs or dates).
    """

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
