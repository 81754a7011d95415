"""Dead letters: inputs that cannot be applied, kept with a readable reason until they are replayed.

Each domain registers how its letters are replayed (`replayer`), so one replay command serves all.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, metrics
from worker.logs import get_logger
from worker.tables import dead_letters

log = get_logger(__name__)

MAX_REASON_CHARS = 2000


class Rejected(Exception):
    """This input can never be applied as it is: it belongs in dead_letters, with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Letter:
    source: str
    payload: Any
    reason: str
    ref: str | None = None
    task_name: str | None = None


# Applies a letter's payload in the caller's transaction and returns what to do once that commits
# (e.g. publish quotas); raises Rejected when the payload still cannot be applied.
AfterCommit = Callable[[], None]
Replayer = Callable[[Connection, Any, datetime], AfterCommit]


def nothing_after_commit() -> None:
    """The after-commit step of a replay that has nothing to publish."""


_replayers: dict[str, Replayer] = {}


def replayer(source: str) -> Callable[[Replayer], Replayer]:
    """Register how letters of `source` are applied again; the function raises Rejected when it still fails."""

    def register(function: Replayer) -> Replayer:
        _replayers[source] = function
        return function

    return register


def storable(payload: Any) -> Any:
    """The payload as PostgreSQL jsonb can hold it: UTF-8 JSON without NUL characters, else its repr."""
    try:
        json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError):  # UnicodeEncodeError (a lone surrogate) is a ValueError
        return {"unparsed": repr(payload)}
    if "\\u0000" in json.dumps(payload):  # jsonb refuses NUL in strings
        return {"unparsed": repr(payload)}
    return payload


def storable_text(value: Any, limit: int = 200) -> str | None:
    """A short string fit for a text column (an event id echoed back), else None."""
    if not isinstance(value, str) or "\x00" in value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value[:limit]


def record(conn: Connection, letters: Iterable[Letter], now: datetime) -> int:
    """Store letters in one statement; returns how many were stored."""
    rows = [
        {
            "source": letter.source,
            "ref": storable_text(letter.ref),
            "task_name": letter.task_name,
            "payload": storable(letter.payload),
            "reason": letter.reason[:MAX_REASON_CHARS],
            "created_at": now,
        }
        for letter in letters
    ]
    if rows:
        conn.execute(dead_letters.insert(), rows)
        for row in rows:
            log.warning("dead_lettered", source=row["source"], ref=row["ref"], reason=row["reason"])
        for source, count in Counter(row["source"] for row in rows).items():
            db.after_commit(functools.partial(metrics.dead_lettered, source, count))
    return len(rows)


def list_letters(conn: Connection, include_replayed: bool = False, limit: int = 100) -> list[dict]:
    query = sa.select(dead_letters).order_by(dead_letters.c.id).limit(limit)
    if not include_replayed:
        query = query.where(dead_letters.c.replayed_at.is_(None))
    return [dict(row._mapping) for row in conn.execute(query)]


def pending_ids(conn: Connection) -> list[int]:
    query = sa.select(dead_letters.c.id).where(dead_letters.c.replayed_at.is_(None)).order_by(dead_letters.c.id)
    return list(conn.scalars(query))


@dataclass(frozen=True)
class ReplayResult:
    letter_id: int
    reason: str | None  # None: applied; else why it failed again (the letter stays, with this reason)
    after_commit: AfterCommit = nothing_after_commit


def replay(conn: Connection, letter_id: int, now: datetime) -> ReplayResult:
    """Apply one letter again in the caller's transaction; call `after_commit` once that has committed."""
    row = conn.execute(
        sa.select(dead_letters).where(dead_letters.c.id == letter_id).with_for_update(skip_locked=True)
    ).first()
    if row is None:
        raise LookupError(f"dead letter {letter_id} does not exist or is being replayed elsewhere")
    if row.replayed_at is not None:
        raise LookupError(f"dead letter {letter_id} was already replayed at {row.replayed_at.isoformat()}")
    apply = _replayers.get(row.source)
    reason = None
    after_commit = nothing_after_commit
    if apply is None:
        reason = f"no replay handler for source {row.source!r}"
    else:
        try:
            with conn.begin_nested():
                after_commit = apply(conn, row.payload, now)
        except Rejected as exc:
            reason = exc.reason
    values: dict[str, Any] = {"replay_count": dead_letters.c.replay_count + 1, "last_replay_at": now}
    if reason is None:
        values["replayed_at"] = now
    else:
        values["reason"] = reason[:MAX_REASON_CHARS]
    conn.execute(sa.update(dead_letters).where(dead_letters.c.id == letter_id).values(values))
    log.info("dead_letter_replayed", letter_id=letter_id, source=row.source, ok=reason is None, reason=reason)
    return ReplayResult(letter_id, reason, after_commit if reason is None else nothing_after_commit)
