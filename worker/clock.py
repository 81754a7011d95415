"""The worker's clock: the one place that reads the current time, so every business time is explicit.

Domain functions take `now` as an argument; tasks, the web and commands read it here once per unit of
work (or parse it from an operator's argument), and freezegun moves it in tests.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_moment(value: str | None) -> datetime:
    """An optional ISO-8601 time with a UTC offset (a task's `now` argument); the current time when None."""
    if value is None:
        return utcnow()
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset")
    return parsed
