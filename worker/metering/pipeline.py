"""A batch of usage events applied in one transaction of a few set-based statements.

Each statement works over rows pre-aggregated in Python and sorted by key, always in the same table
order, so concurrent batches never deadlock:

    profiles (read with the batch's periods, locked FOR KEY SHARE, which no other batch waits for)
    -> usage_events (ledger, drops duplicates) -> usage_hour_conversations -> usage_tracking
    -> usage_periods -> usage_alerts -> subscriptions

Only events the ledger accepted as new flow into the totals, so redelivered and duplicate events change
nothing. Time is the event's: usage is split exactly (integer milliseconds) across UTC hours and across
billing periods; late usage lands in the hour and the period it happened in. A bad event is rejected
alone: screening sorts every event before the first write, and its dead letter is written so that it
cannot fail (dead_letters.write), so its neighbours are applied.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, metrics, periods, quota
from worker.clock import utcnow
from worker.dead_letters import Letter, Rejected, replayer, storable_text, write
from worker.logs import get_logger
from worker.metering.events import UsageEvent, hourly_totals, overlap_ms, parse_event, to_datetime, to_ms
from worker.metering.limits import mark_subscriptions, raise_alerts
from worker.metering.tracking import add_tracking, tracking_rows
from worker.sqlarrays import bare_array, ms_time, text_array

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


_INSERT_LEDGER = sa.text(
    f"""
    WITH e AS (
        SELECT * FROM unnest(CAST(:event_ids AS text[]), CAST(:user_ids AS uuid[]), CAST(:started AS bigint[]),
                             CAST(:durations AS bigint[]), CAST(:languages AS text[]), CAST(:conversations AS uuid[]),
                             CAST(:features AS text[]))
             AS e(event_id, user_id, started_ms, duration_ms, language, conversation_id, feature)
    ), inserted AS (
        INSERT INTO usage_events (event_id, user_id, started_at, duration_ms, language, conversation_id, feature,
                                  received_at)
        SELECT e.event_id, e.user_id, {ms_time("e.started_ms")}, e.duration_ms, e.language, e.conversation_id,
               e.feature, :now
        FROM e
        ORDER BY e.event_id
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
    )
    SELECT event_id FROM e WHERE event_id NOT IN (SELECT event_id FROM inserted)
    """
)


def _insert_ledger(conn: Connection, events: list[UsageEvent], now: datetime) -> set[str]:
    """Insert into the ledger; returns the ids it held already (the rest are new). Only those few come
    back: returning the new ones cost a row each in Python."""
    rows = conn.execute(
        _INSERT_LEDGER,
        {
            "now": now,
            "event_ids": text_array([e.event_id for e in events]),
            "user_ids": bare_array([e.user_id for e in events]),
            "started": bare_array([e.started_ms for e in events]),
            "durations": bare_array([e.duration_ms for e in events]),
            "languages": text_array([e.language for e in events]),
            "conversations": text_array([e.conversation_id for e in events]),
            "features": text_array([e.feature for e in events]),
        },
    )
    return set(rows.scalars())


# -- the batch's users, read once before any write ---------------------------------------------------------

# Each user that exists, the plan of their subscription (NULL: none yet), and the periods overlapping the
# span of their events (none without a subscription row: ensure_periods gives them one first). The
# profiles are locked (FOR KEY SHARE, until the commit) against being deleted: the ledger and the
# conversation keys hold user ids without a foreign key, whose checks took this lock once per row.
_READ_USERS = sa.text(
    f"""
    SELECT w.user_id::text, s.plan_type, u.id, u.period_start, u.period_end, u.limit_ms
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:firsts AS bigint[]), CAST(:lasts AS bigint[]))
         AS w(user_id, first_ms, last_ms)
    JOIN profiles p ON p.id = w.user_id
    LEFT JOIN subscriptions s ON s.user_id = w.user_id
    LEFT JOIN usage_periods u ON u.user_id = s.user_id
         AND u.period_start < {ms_time("w.last_ms")} AND u.period_end > {ms_time("w.first_ms")}
    ORDER BY w.user_id, u.period_start
    FOR KEY SHARE OF p
    """
)


@dataclass
class Users:
    """What one read tells of a batch's users, before any write: who exists (the keys of `plans`), the
    plan of each one's subscription (None: no subscription row yet), the periods overlapping each one's
    events (in time order; not locked), and each one's quota cache generation (read before PostgreSQL)."""

    plans: dict[str, str | None] = field(default_factory=dict)
    periods: dict[str, list[periods.Period]] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)


def _spans_ms(events: Iterable[UsageEvent]) -> dict[str, tuple[int, int]]:
    """Per user, the smallest [first, last) in epoch milliseconds covering all of their events."""
    spans: dict[str, tuple[int, int]] = {}
    for event in events:
        span = spans.get(event.user_id)
        end = event.started_ms + event.duration_ms
        if span is None:
            spans[event.user_id] = (event.started_ms, end)
        elif event.started_ms < span[0] or end > span[1]:
            spans[event.user_id] = (min(span[0], event.started_ms), max(span[1], end))
    return spans


def read_users(conn: Connection, spans: dict[str, tuple[int, int]]) -> Users:
    """The users of `spans` (each one's span of usage, epoch ms), their profiles locked until the commit."""
    user_ids = sorted(spans)
    users = Users(generations=quota.generations(user_ids))
    rows = conn.execute(
        _READ_USERS,
        {
            "user_ids": bare_array(user_ids),
            "firsts": bare_array([spans[user_id][0] for user_id in user_ids]),
            "lasts": bare_array([spans[user_id][1] for user_id in user_ids]),
        },
    ).all()
    for user_id, plan, period_id, start, end, limit_ms in rows:
        users.plans[user_id] = plan
        if period_id is not None:
            users.periods.setdefault(user_id, []).append(periods.Period(period_id, user_id, start, end, limit_ms))
    return users


# -- periods -----------------------------------------------------------------------------------------------

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


@functools.lru_cache(maxsize=4096)
def _bound_ms(moment: datetime) -> int:
    """A period bound in epoch milliseconds; a batch's users share a few bounds, so each is converted once."""
    return to_ms(moment)


def covers(found: Sequence[periods.Period], first_ms: int, last_ms: int) -> bool:
    """Whether periods (in time order) cover [first_ms, last_ms) without a gap."""
    return (
        bool(found)
        and _bound_ms(found[0].start) <= first_ms
        and _bound_ms(found[-1].end) >= last_ms
        and all(earlier.end == later.start for earlier, later in pairwise(found))
    )


def _period_usage(events: list[UsageEvent], users: Users, spans: dict[str, tuple[int, int]]) -> PeriodUsage:
    """Split the usage between the periods read with the users (`spans`: each user's span of `events`);
    users whose periods do not cover their usage yet are left to `_add_to_periods`, which creates them."""
    by_user: dict[str, list[periods.Period]] = {}
    missing: dict[str, periods.Span] = {}
    for user_id, (first, last) in spans.items():
        found = [p for p in users.periods.get(user_id, ()) if _bound_ms(p.start) < last and _bound_ms(p.end) > first]
        if covers(found, first, last):
            by_user[user_id] = found
        else:
            missing[user_id] = periods.Span(to_datetime(first), to_datetime(last))
    added = _split_by_period([e for e in events if e.user_id not in missing], by_user)
    return PeriodUsage(added, missing, _by_id(by_user))


def _by_id(by_user: dict[str, list[periods.Period]]) -> dict[int, periods.Period]:
    return {period.id: period for found in by_user.values() for period in found}


def _split_by_period(events: list[UsageEvent], by_user: dict[str, list[periods.Period]]) -> dict[int, int]:
    bounds = {p.id: (_bound_ms(p.start), _bound_ms(p.end)) for found in by_user.values() for p in found}
    added: dict[int, int] = defaultdict(int)
    for event in events:
        for period in by_user.get(event.user_id, ()):
            ms = overlap_ms(event, *bounds[period.id])
            if ms:
                added[period.id] += ms
    return added


class PeriodRow(NamedTuple):
    """A usage_periods row as a batch updated it."""

    id: int
    user_id: str
    period_start: datetime
    period_end: datetime
    used_before: int
    used_ms: int
    limit_ms: int


def _add_to_periods(conn: Connection, usage: PeriodUsage, events: list[UsageEvent], now: datetime) -> list[PeriodRow]:
    """Add the usage to its periods (creating missing ones), raise the alerts it crosses and mark the
    subscriptions; returns the period rows as updated."""
    added, read = usage.added, usage.read
    if usage.missing:  # a user's first usage, or usage beyond the periods known so far: four more statements
        periods.ensure_periods(conn, usage.missing, now)
        by_user = periods.periods_overlapping(conn, usage.missing)
        added = {**added, **_split_by_period([e for e in events if e.user_id in usage.missing], by_user)}
        read = {**read, **_by_id(by_user)}
    ids = sorted(added)
    result = conn.execute(_ADD_TO_PERIODS, {"ids": bare_array(ids), "ms": bare_array([added[i] for i in ids])})
    rows = [PeriodRow(*row) for row in result]
    moved = len(rows) != len(ids) or any(
        (row.period_start, row.period_end) != (read[row.id].start, read[row.id].end) for row in rows
    )
    if moved:  # a Stripe period change committed between the split and the lock: split again
        raise db.StaleRead("a period of this batch's users moved while the batch was being applied")
    raise_alerts(conn, rows, now)
    mark_subscriptions(conn, rows, now)
    return rows


def _quotas(
    conn: Connection, period_rows: list[PeriodRow], users: Users, user_ids: set[str], now: datetime
) -> dict[str, quota.Quota]:
    """The quota of each user, from the period rows just updated when one of them holds `now` (as
    quota.read would answer after the writes); the others (usage only in an earlier period, or a user whose
    subscription this batch created) are read."""
    answers: dict[str, quota.Quota] = {}
    plans, generations = users.plans, users.generations
    for _, user_id, start, end, _, used_ms, limit_ms in period_rows:
        plan = plans.get(user_id)
        if plan is not None and start <= now < end:
            answers[user_id] = quota.Quota.from_ms(
                user_id, plan, limit_ms, used_ms, start, end, generations.get(user_id, -1)
            )
    rest = user_ids - answers.keys()
    if rest:
        answers.update(quota.read(conn, rest, now))
    return answers


@dataclass
class Screened:
    """A batch sorted before any write: applicable events (with their index), duplicates within the
    batch, rejections (in batch order), and what was read of its users."""

    events: list[tuple[int, UsageEvent]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    users: Users = field(default_factory=Users)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # each user's span of `events`, epoch ms


def screen(conn: Connection, raw_events: Sequence[Any], now: datetime) -> Screened:
    """Validate every event, keep the first of each id, read the users, and reject events of unknown users."""
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
    spans = _spans_ms(event for _, event in valid)
    if valid:
        screened.users = read_users(conn, spans)
    known = screened.users.plans
    for index, event in valid:
        if event.user_id in known:
            screened.events.append((index, event))
        else:
            screened.rejected.append(Rejection(index, event.event_id, f"unknown user_id {event.user_id}"))
    screened.spans = {user_id: span for user_id, span in spans.items() if user_id in known}
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
    recorded = _insert_ledger(conn, events, now) if events else set()
    new_events = [event for event in events if event.event_id not in recorded]
    outcome.accepted = [event.event_id for event in new_events]
    outcome.duplicates += [event.event_id for event in events if event.event_id in recorded]
    if new_events:
        # All that takes no row lock comes first: batches that share users wait for each other from the
        # first row one locks (the conversations, then usage_tracking) until its commit, so that stretch
        # holds only the writes themselves.
        totals = hourly_totals(new_events)
        tracking = tracking_rows(totals, now)
        spans = screened.spans if len(new_events) == len(events) else _spans_ms(new_events)
        usage = _period_usage(new_events, screened.users, spans)
        add_tracking(conn, tracking, totals)
        period_rows = _add_to_periods(conn, usage, new_events, now)
        outcome.quotas = _quotas(conn, period_rows, screened.users, {event.user_id for event in new_events}, now)
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
