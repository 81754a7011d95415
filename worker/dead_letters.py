"""Dead letters: inputs that cannot be applied, kept with a readable reason until they are replayed.

Writing a letter never fails the work around it: whatever the input holds, what PostgreSQL can store of it
is stored (`storable`), so a bad event is rejected alone and its neighbours are applied. Each domain
registers how its letters are replayed (`replayer`), so one replay command serves all.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, metrics
from worker.errors import Invalid
from worker.logs import get_logger
from worker.tables import dead_letters

log = get_logger(__name__)

MAX_REASON_CHARS = 2000
MAX_PAYLOAD_DEPTH = 64  # PostgreSQL's jsonb input recurses; deeper payloads are kept as an excerpt of text
MAX_PAYLOAD_CHARS = 1_000_000  # one letter; a larger payload is kept as an excerpt
EXCERPT_CHARS = 4000


class Rejected(Invalid):
    """This input can never be applied as it is: it belongs in dead_letters, with this reason."""


@dataclass(frozen=True)
class Letter:
    source: str
    payload: Any
    reason: str
    ref: str | None = None
    task_name: str | None = None


# Applies a letter's payload in the caller's transaction (registering what follows the commit with
# db.after_commit); raises Rejected when the payload still cannot be applied.
Replayer = Callable[[Connection, Any, datetime], None]

_replayers: dict[str, Replayer] = {}


def replayer(source: str) -> Callable[[Replayer], Replayer]:
    """Register how letters of `source` are applied again; the function raises Rejected when it still fails."""

    def register(function: Replayer) -> Replayer:
        _replayers[source] = function
        return function

    return register


# -- what PostgreSQL can hold ------------------------------------------------------------------------------


def storable_text(value: Any, limit: int = 200) -> str | None:
    """A short string fit for a text column (an event id echoed back), else None."""
    if not isinstance(value, str) or "\x00" in value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value[:limit]


def escaped_text(value: str) -> str:
    """Text a PostgreSQL text or jsonb string can hold: NUL and lone surrogates written as escapes."""
    if value.isascii() and "\x00" not in value:
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class _TooDeep(Exception):
    pass


def _escaped(value: Any, depth: int) -> Any:
    """JSON data with every string (keys too) escaped as `escaped_text`; raises _TooDeep past the limit."""
    if depth > MAX_PAYLOAD_DEPTH:
        raise _TooDeep
    if isinstance(value, str):
        return escaped_text(value)
    if isinstance(value, dict):
        return {escaped_text(str(key)): _escaped(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(item, depth + 1) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return escaped_text(repr(value))


def _excerpt(why: str, payload: Any) -> dict[str, str]:
    try:
        text = json.dumps(payload, ensure_ascii=True, allow_nan=True, default=repr)[:EXCERPT_CHARS]
    except (RecursionError, ValueError, TypeError):
        text = f"<{type(payload).__name__}>"
    return {"unstorable": why, "excerpt": escaped_text(text)}


def storable(payload: Any) -> Any:
    """The payload as PostgreSQL jsonb can hold it: itself when it can; else with its strings escaped;
    else (nested deeper than MAX_PAYLOAD_DEPTH, larger than MAX_PAYLOAD_CHARS, numbers JSON has no
    spelling for) an object saying why, with an excerpt of its text."""
    try:
        text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
        if len(text) > MAX_PAYLOAD_CHARS:
            return _excerpt(f"larger than {MAX_PAYLOAD_CHARS} characters as JSON", payload)
        if "\\u0000" not in text and (text.isascii() or _is_utf8(text)):
            deep = nesting_depth(payload, MAX_PAYLOAD_DEPTH) > MAX_PAYLOAD_DEPTH
            return _excerpt(_too_deep(), payload) if deep else payload
    except RecursionError:
        return _excerpt(_too_deep(), payload)
    except (ValueError, TypeError):  # NaN or infinity, an integer too long to print, a type JSON lacks
        pass
    try:
        escaped = _escaped(payload, 0)
        json.dumps(escaped, allow_nan=False)
    except _TooDeep:
        return _excerpt(_too_deep(), payload)
    except (ValueError, TypeError) as exc:
        return _excerpt(f"not JSON: {escaped_text(str(exc))[:200]}", payload)
    return escaped


def _too_deep() -> str:
    return f"nested deeper than {MAX_PAYLOAD_DEPTH} levels"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_CONTAINERS = (dict, list, tuple)


def nesting_depth(value: Any, limit: int) -> int:
    """How deeply decoded JSON nests containers (a scalar is 0, `[1]` is 1), without recursion, counted up
    to one past `limit`. Only containers go on the stack: a batch message's thousands of scalars are looked
    at once each (the worker's consumer runs this in its main process for every message)."""
    if not isinstance(value, _CONTAINERS):
        return 0
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level <= limit:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, _CONTAINERS):
                    stack.append((child, level + 1))
    return deepest


# -- writing, listing, replaying ---------------------------------------------------------------------------


def _row(letter: Letter, now: datetime) -> dict[str, Any]:
    return {
        "source": letter.source,
        "ref": storable_text(letter.ref),
        "task_name": storable_text(letter.task_name),
        "payload": storable(letter.payload),
        "reason": escaped_text(letter.reason)[:MAX_REASON_CHARS],
        "created_at": now,
    }


def write(conn: Connection, letters: Sequence[Letter], now: datetime) -> int:
    """Store letters in one statement in the caller's transaction; returns how many were stored. A letter
    PostgreSQL still refuses is stored as the reason alone, so writing letters never fails the batch."""
    if not letters:
        return 0
    rows = [_row(letter, now) for letter in letters]
    try:
        with conn.begin_nested():
            conn.execute(dead_letters.insert(), rows)
    except sa.exc.DataError as exc:  # defence in depth: storable() should have made this impossible
        log.error("dead_letter_payload_refused", error=str(exc.orig).splitlines()[0])
        for row in rows:
            row["payload"] = {"unstorable": "PostgreSQL refused the payload"}
        conn.execute(dead_letters.insert(), rows)
    for row in rows:
        log.warning("dead_lettered", source=row["source"], ref=row["ref"], reason=row["reason"])
    for source, count in Counter(row["source"] for row in rows).items():
        db.after_commit(conn, functools.partial(metrics.dead_lettered, source, count))
    return len(rows)


def list_letters(conn: Connection, include_replayed: bool = False, limit: int = 100) -> list[dict[str, Any]]:
    query = sa.select(dead_letters).order_by(dead_letters.c.id).limit(limit)
    if not include_replayed:
        query = query.where(dead_letters.c.replayed_at.is_(None))
    return [dict(row._mapping) for row in conn.execute(query)]


def pending_ids(conn: Connection) -> list[int]:
    query = sa.select(dead_letters.c.id).where(dead_letters.c.replayed_at.is_(None)).order_by(dead_letters.c.id)
    return list(conn.scalars(query))


def replay(conn: Connection, letter_id: int, now: datetime) -> str | None:
    """Apply one letter again in the caller's transaction (of db.transaction()). Returns None when it was
    applied, else why it failed again (the letter stays, with that reason). LookupError when the letter
    is absent, already replayed or being replayed elsewhere."""
    row = conn.execute(
        sa.select(dead_letters).where(dead_letters.c.id == letter_id).with_for_update(skip_locked=True)
    ).first()
    if row is None:
        raise LookupError(f"dead letter {letter_id} does not exist or is being replayed elsewhere")
    if row.replayed_at is not None:
        raise LookupError(f"dead letter {letter_id} was already replayed at {row.replayed_at.isoformat()}")
    apply = _replayers.get(row.source)
    reason = None
    if apply is None:
        reason = f"no replay handler for source {row.source!r}"
    else:
        try:
            with conn.begin_nested():
                apply(conn, row.payload, now)
        except Rejected as exc:
            reason = exc.reason
    values: dict[str, Any] = {"replay_count": dead_letters.c.replay_count + 1, "last_replay_at": now}
    if reason is None:
        values["replayed_at"] = now
    else:
        values["reason"] = escaped_text(reason)[:MAX_REASON_CHARS]
    conn.execute(sa.update(dead_letters).where(dead_letters.c.id == letter_id).values(values))
    log.info("dead_letter_replayed", letter_id=letter_id, source=row.source, ok=reason is None, reason=reason)
    return reason
