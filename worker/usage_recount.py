"""Period totals recounted from the usage ledger.

`usage_periods.used_ms` is the sum of the ledger's events over each period, split exactly as metering
splits them (`metering.overlap_ms`). When period bounds move (Stripe starts a period somewhere else) or a
total is wrong (`rebuild-usage`), the totals are computed again from every ledger event of the user that
overlaps the period, so usage follows the time it happened. Only `usage_periods` is written here; the
caller updates the subscription's view of its current period.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.config import settings
from worker.metering.events import UsageEvent, overlap_ms, to_ms
from worker.sqlarrays import bare_array, time_array

STREAM_ROWS = 10_000  # ledger rows fetched per round trip while summing period totals

EVENT_COLUMNS = """e.event_id, e.user_id::text AS user_id, e.started_at, e.duration_ms, e.language,
                   e.conversation_id::text AS conversation_id, e.feature"""

_EVENTS_OF_USERS = sa.text(
    f"""
    SELECT {EVENT_COLUMNS}
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:firsts AS timestamptz[]), CAST(:lasts AS timestamptz[]))
         AS w(user_id, first_at, last_at)
    JOIN usage_events e ON e.user_id = w.user_id AND e.started_at < w.last_at AND e.started_at > w.first_at - :longest
    """
)

_PERIODS_IN_RANGE = sa.text(
    """
    SELECT id, user_id::text AS user_id, period_start, period_end, used_ms, limit_ms FROM usage_periods
    WHERE period_start < :end AND period_end > :start
      AND (CAST(:user_ids AS uuid[]) IS NULL OR user_id = ANY(CAST(:user_ids AS uuid[])))
    ORDER BY id
    FOR UPDATE
    """
)

_SET_PERIOD_TOTALS = sa.text(
    """
    UPDATE usage_periods u SET used_ms = d.used_ms
    FROM unnest(CAST(:ids AS bigint[]), CAST(:used AS bigint[])) AS d(id, used_ms)
    WHERE u.id = d.id
    """
)


def longest_event() -> timedelta:
    """No ledger event is longer (events are found by start time back this far before a range)."""
    return timedelta(seconds=settings().usage_max_event_seconds)


def ledger_event(row: Any) -> UsageEvent:
    """A ledger row selected with EVENT_COLUMNS."""
    return UsageEvent(
        row.event_id,
        row.user_id,
        to_ms(row.started_at),
        row.duration_ms,
        row.language,
        row.conversation_id,
        row.feature,
    )


@dataclass(frozen=True)
class PeriodTotal:
    id: int
    user_id: str
    period_start: datetime
    period_end: datetime
    limit_ms: int
    stored_ms: int  # used_ms as it was before the recount
    used_ms: int  # from the ledger (written when it differs)


def _ledger_totals(conn: Connection, rows: Sequence[Any]) -> dict[int, int]:
    """Each period's exact usage in ms, from all ledger events of its user that overlap it."""
    by_user: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_user[row.user_id].append(row)
    users = sorted(by_user)
    params = {
        "user_ids": bare_array(users),
        "firsts": time_array(min(row.period_start for row in by_user[user]) for user in users),
        "lasts": time_array(max(row.period_end for row in by_user[user]) for user in users),
        "longest": longest_event(),
    }
    used = dict.fromkeys((row.id for row in rows), 0)
    for ledger_row in conn.execute(_EVENTS_OF_USERS, params, execution_options={"yield_per": STREAM_ROWS}):
        event = ledger_event(ledger_row)
        for row in by_user[event.user_id]:
            used[row.id] += overlap_ms(event, to_ms(row.period_start), to_ms(row.period_end))
    return used


def recount_periods(
    conn: Connection, start: datetime, end: datetime, user_ids: Sequence[str] | None = None
) -> list[PeriodTotal]:
    """Recompute from the ledger the totals of the periods overlapping [start, end) (of these users, or of
    everyone), in the caller's transaction, locking them; the ones that differ are written. Returns every
    period checked, in id order."""
    users = bare_array(sorted(user_ids)) if user_ids is not None else None
    params = {"start": start, "end": end, "user_ids": users}
    rows = conn.execute(_PERIODS_IN_RANGE, params).all()
    if not rows:
        return []
    used = _ledger_totals(conn, rows)
    changed = [row.id for row in rows if row.used_ms != used[row.id]]
    if changed:
        used_ms = bare_array([used[period_id] for period_id in changed])
        conn.execute(_SET_PERIOD_TOTALS, {"ids": bare_array(changed), "used": used_ms})
    return [
        PeriodTotal(row.id, row.user_id, row.period_start, row.period_end, row.limit_ms, row.used_ms, used[row.id])
        for row in rows
    ]
