"""Rebuilding usage from the ledger: `python -m worker rebuild-usage --from ... --to ...`.

The ledger `usage_events` is the source of truth; `usage_tracking`, `usage_hour_conversations`, the
period totals in `usage_periods` and the subscription's whole-minute view derive from it. When derived
rows are wrong (a bug, a manual edit, one table restored from a backup) the operator recomputes them
for a time range and is told what changed:

- The range is widened to whole UTC hours. Each usage_tracking row of those hours is recomputed from
  every ledger event overlapping its hour, including events that started before the range or end after
  it; missing rows are created and rows the ledger does not support are removed. The conversations of
  those hours (`usage_hour_conversations`) are rebuilt with them, so that later batches keep counting
  distinct conversations right. The splitting is metering's own (`hourly_totals`, `overlap_ms`).
- Every usage period overlapping the range gets its total recomputed from all of its events (a period
  is longer than the range), and so do the subscription's `monthly_minutes_used` and `limit_reached_at`.
  Missing periods of the users metered in the range are created first. Alerts are left as they are:
  they record when a threshold was crossed.
- Metering waits while a rebuild runs: the ledger is locked against inserts (SHARE) first, in metering's
  lock order, so no batch can commit between the rebuild's read of the ledger and its writes.

Events are found by start time back to USAGE_MAX_EVENT_SECONDS before the range (no ledger event is
longer, unless that setting was lowered since: then widen --from by the old maximum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, periods, quota
from worker.metering.events import HOUR_MS, HourTotals, UsageEvent, hourly_totals, to_datetime, to_ms
from worker.metering.tracking import HOUR_START, replace_tracking
from worker.sqlarrays import array_literal, bare_array, time_array
from worker.usage_recount import EVENT_COLUMNS, PeriodTotal, ledger_event, longest_event, recount_periods

ACTOR = "rebuild-usage"  # audit_logs.actor of the subscription changes a rebuild makes


@dataclass(frozen=True)
class Change:
    table: str
    what: str  # created, corrected or removed
    key: str
    detail: str


@dataclass
class Report:
    start: datetime  # whole UTC hours
    end: datetime
    events: int = 0  # ledger events overlapping the range
    hours_checked: int = 0
    periods_checked: int = 0
    changes: list[Change] = field(default_factory=list)
    users_changed: set[str] = field(default_factory=set)  # their cached quota is out of date


def hour_range(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """[start, end) widened to whole UTC hours."""
    first, last = to_ms(start), to_ms(end)
    return to_datetime(first - first % HOUR_MS), to_datetime(-(-last // HOUR_MS) * HOUR_MS)


def rebuild(conn: Connection, start: datetime, end: datetime, now: datetime) -> Report:
    """Recompute what derives from the ledger for [start, end) in the caller's transaction."""
    if not start < end:
        raise ValueError(f"--from ({start.isoformat()}) must be before --to ({end.isoformat()})")
    report = Report(*hour_range(start, end))
    conn.execute(sa.text("LOCK TABLE usage_events IN SHARE MODE"))
    db.set_actor(conn, ACTOR)
    events = _events_overlapping(conn, report.start, report.end)
    report.events = len(events)
    spans = periods.spans_of((e.user_id, e.started_at, to_datetime(e.ended_ms)) for e in events)
    periods.ensure_periods(conn, spans, now)
    _rebuild_hours(conn, report, events, now)
    _rebuild_periods(conn, report, now)
    _invalidate_after_commit(conn, report.users_changed)
    return report


def _invalidate_after_commit(conn: Connection, user_ids: set[str]) -> None:
    """Quota answers cached before the rebuild may be wrong: they go once it commits."""
    if user_ids:
        changed = sorted(user_ids)
        db.after_commit(conn, lambda: quota.invalidate(changed))


# -- the ledger ----------------------------------------------------------------------------------------------

_EVENTS_OVERLAPPING = sa.text(
    f"""
    SELECT {EVENT_COLUMNS} FROM usage_events e
    WHERE e.started_at < :end AND e.started_at > :earliest
      AND e.started_at + e.duration_ms * interval '1 millisecond' > :start
    """
)


def _events_overlapping(conn: Connection, start: datetime, end: datetime) -> list[UsageEvent]:
    params = {"start": start, "end": end, "earliest": start - longest_event()}
    return [ledger_event(row) for row in conn.execute(_EVENTS_OVERLAPPING, params)]


# -- usage_tracking and usage_hour_conversations ---------------------------------------------------------

_TRACKING_IN_RANGE = sa.text(
    f"""
    SELECT t.user_id::text AS user_id, {HOUR_START} AS hour_start,
           t.microphone_ms, t.microphone_seconds, t.message_count, t.conversation_count, t.language_breakdown,
           t.feature_usage
    FROM usage_tracking t
    WHERE t.date BETWEEN (CAST(:start AS timestamptz) AT TIME ZONE 'UTC')::date
                     AND (CAST(:end AS timestamptz) AT TIME ZONE 'UTC')::date
      AND {HOUR_START} >= :start
      AND {HOUR_START} < :end
    ORDER BY t.user_id, t.date, t.hour
    FOR UPDATE
    """
)

_REMOVE_TRACKING = sa.text(
    """
    DELETE FROM usage_tracking t
    USING unnest(CAST(:user_ids AS uuid[]), CAST(:hours AS timestamptz[])) AS d(user_id, hour_start)
    WHERE t.user_id = d.user_id AND t.date = (d.hour_start AT TIME ZONE 'UTC')::date
      AND t.hour = EXTRACT(HOUR FROM d.hour_start AT TIME ZONE 'UTC')::int
    """
)

_CONVERSATIONS_IN_RANGE = sa.text(
    """
    SELECT user_id::text, hour_start, conversation_id::text FROM usage_hour_conversations
    WHERE hour_start >= :start AND hour_start < :end
    """
)

_ADD_CONVERSATIONS = sa.text(
    """
    INSERT INTO usage_hour_conversations (user_id, hour_start, conversation_id)
    SELECT * FROM unnest(CAST(:user_ids AS uuid[]), CAST(:hours AS timestamptz[]), CAST(:conversations AS uuid[]))
    ORDER BY 1, 2, 3
    """
)

_REMOVE_CONVERSATIONS = sa.text(
    """
    DELETE FROM usage_hour_conversations c
    USING unnest(CAST(:user_ids AS uuid[]), CAST(:hours AS timestamptz[]), CAST(:conversations AS uuid[]))
          AS d(user_id, hour_start, conversation_id)
    WHERE (c.user_id, c.hour_start, c.conversation_id) = (d.user_id, d.hour_start, d.conversation_id)
    """
)


@dataclass(frozen=True)
class HourRow:
    """The fields of a usage_tracking row that derive from the ledger, in comparable form."""

    microphone_ms: int
    microphone_seconds: int  # the seed's column dashboards read: floor(microphone_ms / 1000)
    message_count: int
    conversation_count: int
    language_ms: dict[str, int] | None  # None: the stored value is not a JSON object of numbers
    feature_counts: dict[str, int] | None

    @classmethod
    def computed(cls, totals: HourTotals) -> HourRow:
        return cls(
            totals.microphone_ms,
            totals.microphone_ms // 1000,
            totals.message_count,
            len(totals.conversations),
            dict(totals.language_ms),
            dict(totals.feature_counts),
        )

    @classmethod
    def stored(cls, row: Any) -> HourRow:
        return cls(
            row.microphone_ms,
            row.microphone_seconds,
            row.message_count or 0,
            row.conversation_count or 0,
            _integers(row.language_breakdown, scale=1000),  # seconds with up to 3 decimals -> ms
            _integers(row.feature_usage, scale=1),
        )

    def differences(self, other: HourRow) -> str:
        return ", ".join(
            f"{name} {getattr(self, name)} -> {getattr(other, name)}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        )


EMPTY_HOUR = HourRow(0, 0, 0, 0, {}, {})


def _integers(value: Any, scale: int) -> dict[str, int] | None:
    """A stored JSON object of numbers, scaled to integers; None when it is anything else (NULL included)."""
    if not isinstance(value, dict):
        return None
    try:
        scaled = {key: Decimal(str(number)) * scale for key, number in value.items()}
    except InvalidOperation:
        return None
    if any(number != number.to_integral_value() for number in scaled.values()):
        return None
    return {key: int(number) for key, number in scaled.items()}


def _hour_key(user_id: str, hour_ms: int) -> str:
    return f"user {user_id} hour {to_datetime(hour_ms):%Y-%m-%d %H:00}Z"


def _hour_keys(keys: Sequence[tuple[Any, ...]]) -> dict[str, str]:
    """The users and hour starts of sorted (user, hour ms, ...) keys, as arrays for unnest."""
    return {"user_ids": bare_array([key[0] for key in keys]), "hours": time_array(to_datetime(key[1]) for key in keys)}


def _rebuild_conversations(conn: Connection, report: Report, computed: dict[tuple[str, int], HourTotals]) -> None:
    rows = conn.execute(_CONVERSATIONS_IN_RANGE, {"start": report.start, "end": report.end})
    stored = {(user, to_ms(hour), conversation) for user, hour, conversation in rows}
    wanted = {(user, hour, conversation) for (user, hour), t in computed.items() for conversation in t.conversations}
    for statement, keys, what in (
        (_REMOVE_CONVERSATIONS, sorted(stored - wanted), "removed"),
        (_ADD_CONVERSATIONS, sorted(wanted - stored), "created"),
    ):
        if keys:
            conn.execute(statement, {**_hour_keys(keys), "conversations": bare_array([key[2] for key in keys])})
        for user, hour, conversation in keys:
            report.changes.append(Change("usage_hour_conversations", what, _hour_key(user, hour), conversation))


def _rebuild_hours(conn: Connection, report: Report, events: list[UsageEvent], now: datetime) -> None:
    start_ms, end_ms = to_ms(report.start), to_ms(report.end)
    computed = {key: totals for key, totals in hourly_totals(events).items() if start_ms <= key[1] < end_ms}
    _rebuild_conversations(conn, report, computed)
    rows = conn.execute(_TRACKING_IN_RANGE, {"start": report.start, "end": report.end})
    stored = {(row.user_id, to_ms(row.hour_start)): HourRow.stored(row) for row in rows}
    report.hours_checked = len(stored.keys() | computed.keys())
    to_set = []
    for key in sorted(computed):
        wanted, before = HourRow.computed(computed[key]), stored.get(key)
        if before == wanted:
            continue
        to_set.append(key)
        if before is None:
            report.changes.append(Change("usage_tracking", "created", _hour_key(*key), EMPTY_HOUR.differences(wanted)))
        else:
            report.changes.append(Change("usage_tracking", "corrected", _hour_key(*key), before.differences(wanted)))
    to_remove = sorted(stored.keys() - computed.keys())
    for key in to_remove:
        report.changes.append(Change("usage_tracking", "removed", _hour_key(*key), "no ledger event in this hour"))
    if to_set:
        hours_to_set = {key: computed[key] for key in to_set}
        conversations = {key: len(totals.conversations) for key, totals in hours_to_set.items()}
        replace_tracking(conn, hours_to_set, conversations, now)
    if to_remove:
        conn.execute(_REMOVE_TRACKING, _hour_keys(to_remove))
    report.users_changed.update(user for user, _ in [*to_set, *to_remove])


# -- period totals ---------------------------------------------------------------------------------------

_SUBSCRIPTIONS = sa.text(
    """
    SELECT user_id::text AS user_id, current_period_start, monthly_minutes_used, limit_reached_at
    FROM subscriptions WHERE user_id = ANY(CAST(:user_ids AS uuid[]))
    ORDER BY user_id
    FOR UPDATE
    """
)

_SET_SUBSCRIPTIONS = sa.text(
    """
    UPDATE subscriptions s
    SET monthly_minutes_used = d.minutes,
        limit_reached_at = CASE WHEN d.reached THEN COALESCE(s.limit_reached_at, :now) END
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:minutes AS int[]), CAST(:reached AS boolean[]))
         AS d(user_id, minutes, reached)
    WHERE s.user_id = d.user_id
    """
)


def _period_key(row: Any) -> str:
    return f"user {row.user_id} period {row.period_start.isoformat()} to {row.period_end.isoformat()}"


def _rebuild_periods(conn: Connection, report: Report, now: datetime) -> None:
    totals = recount_periods(conn, report.start, report.end)
    report.periods_checked = len(totals)
    changed = [total for total in totals if total.stored_ms != total.used_ms]
    for total in changed:
        detail = f"used_ms {total.stored_ms} -> {total.used_ms}"
        report.changes.append(Change("usage_periods", "corrected", _period_key(total), detail))
    report.users_changed.update(total.user_id for total in changed)
    if totals:
        _rebuild_subscriptions(conn, report, totals, now)


def _rebuild_subscriptions(conn: Connection, report: Report, totals: list[PeriodTotal], now: datetime) -> None:
    current = {(total.user_id, total.period_start): total for total in totals}
    to_set = []
    for sub in conn.execute(_SUBSCRIPTIONS, {"user_ids": bare_array(sorted({total.user_id for total in totals}))}):
        period = current.get((sub.user_id, sub.current_period_start))
        if period is None:
            continue
        minutes, reached = period.used_ms // 60_000, period.used_ms >= period.limit_ms
        if (sub.monthly_minutes_used, sub.limit_reached_at is not None) == (minutes, reached):
            continue
        to_set.append((sub.user_id, minutes, reached))
        detail = (
            f"monthly_minutes_used {sub.monthly_minutes_used} -> {minutes}, "
            f"limit reached {sub.limit_reached_at is not None} -> {reached}"
        )
        report.changes.append(Change("subscriptions", "corrected", f"user {sub.user_id}", detail))
    if to_set:
        conn.execute(
            _SET_SUBSCRIPTIONS,
            {
                "user_ids": bare_array([user for user, _, _ in to_set]),
                "minutes": bare_array([minutes for _, minutes, _ in to_set]),
                "reached": array_literal("t" if reached else "f" for _, _, reached in to_set),
                "now": now,
            },
        )
        report.users_changed.update(user for user, _, _ in to_set)
