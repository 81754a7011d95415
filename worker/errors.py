"""The exception that carries a reason a person can act on; each boundary has its own subclass.

One class holds the reason so every boundary reports it the same way: a dead letter's `reason`, an HTTP
400's `error`, a command's message.
"""

from __future__ import annotations


class Invalid(ValueError):
    """An input that cannot be used as it is, and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
