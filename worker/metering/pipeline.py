"""A batch of usage events applied in one transaction of a few set-based statements.

Each statement works over rows pre-aggregated in Python and sorted by key, always in the same table
order, so concurrent batches never deadlock:

    usage_events (ledger, drops duplicates) -> usage_hour_conversations -> usage_tracking
    -> usage_periods -> usage_alerts -> subscriptions

Only events the ledger accepted as new flow into the totals, so redelivered and duplicate events change
nothing. Time is the event's: usage is split exactly (integer milliseconds) across UTC hours and across
billing periods; late usage lands in the hour and the period it happened in. A bad event is rejected
alone: screening sorts every event before the first write, and its dead letter is written so that it
cannot fail (dead_letters.write), so its neighbours are applied.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, metrics, periods, quota
from worker.clock import utcnow
from worker.dead_letters import Letter, Rejected, replayer, storable_text, write
from worker.logs import get_logger
from worker.metering.events import UsageEvent, hourly_totals, overlap_ms, parse_event, to_datetime, to_ms
from worker.metering.limits import mark_subscriptions, raise_alerts
from worker.metering.tracking import new_conversation_counts, tracking_rows, write_tracking_rows
from worker.sqlarrays import array_literal, bare_array, time_array

log = get_logger(__name__)


# -- applying a batch ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    index: int
    event_id: str | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"index": self.index, "event_id": self.event_id, "reason": self.reason}


@dataclass
class Outcome:
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    quotas: dict[str, quota.Quota] = field(default_factory=dict)


def known_users(conn: Connection, user_ids: Iterable[str]) -> set[str]:
    rows = conn.execute(
        sa.text("SELECT id::text FROM profiles WHERE id = ANY(CAST(:ids AS uuid[]))"),
        {"ids": bare_array(sorted(set(user_ids)))},
    )
    return set(rows.scalars())


_INSERT_LEDGER = sa.text(
    """
    INSERT INTO usage_events (event_id, user_id, started_at, duration_ms, language, conversation_id, feature,
                              received_at)
    SELECT e.event_id, e.user_id, e.started_at, e.duration_ms, e.language, e.conversation_id, e.feature, :now
    FROM unnest(CAST(:event_ids AS text[]), CAST(:user_ids AS uuid[]), CAST(:started AS timestamptz[]),
                CAST(:durations AS bigint[]), CAST(:languages AS text[]), CAST(:conversations AS uuid[]),
                CAST(:features AS text[]))
         AS e(event_id, user_id, started_at, duration_ms, language, conversation_id, feature)
    ORDER BY e.event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
    """
)


def _insert_ledger(conn: Connection, events: list[UsageEvent], now: datetime) -> set[str]:
    """Insert into the ledger; returns the ids that were new (the rest were recorded before)."""
    rows = conn.execute(
        _INSERT_LEDGER,
        {
            "now": now,
            "event_ids": array_literal(e.event_id for e in events),
            "user_ids": bare_array([e.user_id for e in events]),
            "started": time_array(e.started_at for e in events),
            "durations": bare_array([e.duration_ms for e in events]),
            "languages": array_literal(e.language for e in events),
            "conversations": array_literal(e.conversation_id for e in events),
            "features": array_literal(e.feature for e in events),
        },
    )
    return set(rows.scalars())


_ADD_TO_PERIODS = sa.text(
    """
    WITH locked AS (
        SELECT id FROM usage_periods WHERE id = ANY(CAST(:ids AS bigint[])) ORDER BY id FOR UPDATE
    )
    UPDATE usage_periods u SET used_ms = u.used_ms + d.ms
    FROM unnest(CAST(:ids AS bigint[]), CAST(:ms AS bigint[])) AS d(id, ms)
    WHERE u.id = d.id AND u.id IN (SELECT id FROM locked)
    RETURNING u.id, u.user_id::text AS user_id, u.period_start, u.period_end, u.used_ms - d.ms AS used_before,
              u.used_ms, u.limit_ms
    """
)


@dataclass
class PeriodUsage:
    """What a batch adds to each period row (by id), and the users whose periods do not exist yet."""

    added: dict[int, int]
    missing: dict[str, periods.Span]
    read: dict[int, periods.Period]  # the periods as read, to check they did not move before they were locked


def _period_usage(conn: Connection, events: list[UsageEvent]) -> PeriodUsage:
    """Read the periods the events fall in (no lock) and split the usage between them; users whose
    periods do not cover their usage yet are left to `_add_to_periods`, which creates the periods."""
    spans = periods.spans_of((e.user_id, e.started_at, to_datetime(e.ended_ms)) for e in events)
    by_user = periods.periods_overlapping(conn, spans)
    missing = periods.uncovered(spans, by_user)
    added = _split_by_period([e for e in events if e.user_id not in missing], by_user)
    return PeriodUsage(added, missing, _by_id(by_user))


def _by_id(by_user: dict[str, list[periods.Period]]) -> dict[int, periods.Period]:
    return {period.id: period for found in by_user.values() for period in found}


def _split_by_period(events: list[UsageEvent], by_user: dict[str, list[periods.Period]]) -> dict[int, int]:
    bounds = {period.id: (to_ms(period.start), to_ms(period.end)) for found in by_user.values() for period in found}
    added: dict[int, int] = defaultdict(int)
    for event in events:
        for period in by_user.get(event.user_id, ()):
            ms = overlap_ms(event, *bounds[period.id])
            if ms:
                added[period.id] += ms
    return added


def _add_to_periods(conn: Connection, usage: PeriodUsage, events: list[UsageEvent], now: datetime) -> None:
    added, read = usage.added, usage.read
    if usage.missing:  # a user's first usage, or usage beyond the periods known so far: four more statements
        periods.ensure_periods(conn, usage.missing, now)
        by_user = periods.periods_overlapping(conn, usage.missing)
        added = {**added, **_split_by_period([e for e in events if e.user_id in usage.missing], by_user)}
        read = {**read, **_by_id(by_user)}
    ids = sorted(added)
    rows = conn.execute(_ADD_TO_PERIODS, {"ids": bare_array(ids), "ms": bare_array([added[i] for i in ids])}).all()
    moved = len(rows) != len(ids) or any(
        (row.period_start, row.period_end) != (read[row.id].start, read[row.id].end) for row in rows
    )
    if moved:  # a Stripe period change committed between the split and the lock: split again
        raise db.StaleRead("a period of this batch's users moved while the batch was being applied")
    raise_alerts(conn, rows, now)
    mark_subscriptions(conn, rows, now)


@dataclass
class Screened:
    """A batch sorted before any write: applicable events (with their index), duplicates within the
    batch, and rejections (in batch order)."""

    events: list[tuple[int, UsageEvent]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def screen(conn: Connection, raw_events: Sequence[Any], now: datetime) -> Screened:
    """Validate every event, keep the first of each id, and reject events of unknown users."""
    screened = Screened()
    valid: list[tuple[int, UsageEvent]] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_events):
        try:
            event = parse_event(raw, now)
        except Rejected as exc:
            event_id = storable_text(raw.get("event_id")) if isinstance(raw, dict) else None
            screened.rejected.append(Rejection(index, event_id, exc.reason))
            continue
        if event.event_id in seen:
            screened.duplicates.append(event.event_id)
            continue
        seen.add(event.event_id)
        valid.append((index, event))
    known = known_users(conn, (event.user_id for _, event in valid))
    for index, event in valid:
        if event.user_id in known:
            screened.events.append((index, event))
        else:
            screened.rejected.append(Rejection(index, event.event_id, f"unknown user_id {event.user_id}"))
    screened.rejected.sort(key=lambda rejection: rejection.index)
    return screened


def apply_events(
    conn: Connection, raw_events: Sequence[Any], now: datetime, task_name: str | None = None, dead_letter: bool = True
) -> Outcome:
    """Validate and apply a batch in the caller's transaction (of db.transaction()); bad events are
    dead-lettered in it too. Once it commits, the quota of every user it touched is published."""
    screened = screen(conn, raw_events, now)
    outcome = Outcome(duplicates=screened.duplicates, rejected=screened.rejected)
    events = [event for _, event in screened.events]
    new_ids = _insert_ledger(conn, events, now) if events else set()
    new_events = [event for event in events if event.event_id in new_ids]
    outcome.accepted = [event.event_id for event in new_events]
    outcome.duplicates += [event.event_id for event in events if event.event_id not in new_ids]
    if new_events:
        # All that takes no row lock comes first: batches that share users wait for each other from the
        # first row one locks (the conversations, then usage_tracking) until its commit, so that stretch
        # holds only the writes themselves.
        totals = hourly_totals(new_events)
        tracking = tracking_rows(totals, now)
        usage = _period_usage(conn, new_events)
        write_tracking_rows(conn, tracking, new_conversation_counts(conn, totals))
        _add_to_periods(conn, usage, new_events, now)
        outcome.quotas = quota.read(conn, {event.user_id for event in new_events}, now)
        answers = list(outcome.quotas.values())
        db.after_commit(conn, lambda: quota.publish(answers))
    if dead_letter:
        write(
            conn,
            [Letter("usage", raw_events[r.index], r.reason, r.event_id, task_name) for r in outcome.rejected],
            now,
        )
    return outcome


def apply_batch(raw_events: Sequence[Any], origin: str) -> Outcome:
    """Apply a batch in a transaction of its own at the current time, count it and log it. `origin` (a task
    name or a route) is recorded on the batch's dead letters."""
    started = time.perf_counter()
    with db.transaction() as conn:
        outcome = apply_events(conn, raw_events, utcnow(), task_name=origin)
    metrics.usage_batch_committed(
        len(outcome.accepted), len(outcome.duplicates), len(outcome.rejected), len(raw_events),
        time.perf_counter() - started,
    )  # fmt: skip
    log.info(
        "usage_recorded",
        origin=origin,
        accepted=len(outcome.accepted),
        duplicates=len(outcome.duplicates),
        rejected=len(outcome.rejected),
        event_ids=outcome.accepted,
        duplicate_event_ids=outcome.duplicates,
    )
    return outcome


@replayer("usage")
def replay_event(conn: Connection, payload: Any, now: datetime) -> None:
    outcome = apply_events(conn, [payload], now, dead_letter=False)
    if outcome.rejected:
        raise Rejected(outcome.rejected[0].reason)
