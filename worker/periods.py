"""Billing periods: which period a moment of usage belongs to, and moving subscriptions between periods.

Every user has one `usage_periods` row per period that usage or a reset has touched; the row whose start
equals `subscriptions.current_period_start` is the current one. Free plans (and any subscription without
a Stripe subscription) run in calendar months of the user's `profiles.timezone` (UTC when unset or
unknown); Stripe plans run in Stripe's periods, predicted one month at a time until Stripe says otherwise.
The rule for the next and previous period lives in SQL (`next_period_end`, `previous_period_start` in
schema.sql) so that set-based statements and Python agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker.config import settings
from worker.sqlarrays import array_literal, bare_array, time_array

MAX_PERIOD_STEPS = 120  # a reset years late still ends; each step is one statement for all users

# The calendar month (in the zone of profile `p`) that contains the moment :now, as two SQL expressions.
CALENDAR_START = "calendar_month_start(:now, worker_timezone(p.timezone))"
CALENDAR_END = "next_period_end(:now, worker_timezone(p.timezone), true)"


@dataclass(frozen=True)
class Span:
    """The time range a user's new usage covers: [first, last)."""

    first: datetime
    last: datetime


_CREATE_FREE_SUBSCRIPTIONS = sa.text(
    f"""
    INSERT INTO subscriptions (user_id, plan_type, status, current_period_start, current_period_end,
                               reset_date, monthly_minutes_limit, monthly_minutes_used, created_at, updated_at)
    SELECT p.id, 'free', 'active', b.period_start, b.period_end,
           (b.period_end AT TIME ZONE worker_timezone(p.timezone))::date, :free_minutes, 0, :now, :now
    FROM profiles p
    CROSS JOIN LATERAL (
        SELECT {CALENDAR_START} AS period_start, {CALENDAR_END} AS period_end
    ) b
    WHERE p.id = ANY(CAST(:user_ids AS uuid[]))
      AND NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = p.id)
    ORDER BY p.id
    ON CONFLICT (user_id) DO NOTHING
    """
)

_CREATE_CURRENT_PERIODS = sa.text(
    """
    INSERT INTO usage_periods (user_id, period_start, period_end, plan_type, monthly_minutes_limit, limit_ms)
    SELECT s.user_id, s.current_period_start, s.current_period_end, s.plan_type, s.monthly_minutes_limit,
           s.monthly_minutes_limit::bigint * 60000
    FROM subscriptions s
    WHERE s.user_id = ANY(CAST(:user_ids AS uuid[]))
    ORDER BY s.user_id
    ON CONFLICT (user_id, period_start) DO NOTHING
    """
)

# One step outwards for every user whose known periods do not yet cover their usage: the period after
# the last known one, and the period before the first. Repeated until nothing is missing. A period before
# the first known one (late usage from before the subscription's current period) is over, so it is born
# archived: only the current period and those after it are open.
_EXTEND_PERIODS = sa.text(
    """
    WITH wanted AS (
        SELECT * FROM unnest(CAST(:user_ids AS uuid[]), CAST(:firsts AS timestamptz[]),
                             CAST(:lasts AS timestamptz[])) AS w(user_id, first_at, last_at)
    ), known AS (
        SELECT w.user_id, w.first_at, w.last_at, min(u.period_start) AS known_start, max(u.period_end) AS known_end
        FROM wanted w JOIN usage_periods u ON u.user_id = w.user_id
        GROUP BY w.user_id, w.first_at, w.last_at
    ), plan AS (
        SELECT k.*, COALESCE(o.plan_type, s.plan_type) AS plan_type,
               COALESCE(o.minutes, s.monthly_minutes_limit) AS monthly_minutes_limit, worker_timezone(p.timezone) AS tz,
               COALESCE(o.calendar, s.stripe_subscription_id IS NULL OR s.plan_type = 'free') AS calendar
        FROM known k JOIN subscriptions s ON s.user_id = k.user_id JOIN profiles p ON p.id = k.user_id
        LEFT JOIN unnest(CAST(:plan_users AS uuid[]), CAST(:plan_types AS text[]), CAST(:plan_minutes AS int[]),
                         CAST(:plan_calendars AS boolean[])) AS o(user_id, plan_type, minutes, calendar)
               ON o.user_id = k.user_id
        WHERE k.last_at > k.known_end OR k.first_at < k.known_start
    ), missing AS (
        SELECT user_id, known_end AS period_start, next_period_end(known_end, tz, calendar) AS period_end,
               plan_type, monthly_minutes_limit, NULL::timestamptz AS archived_at
        FROM plan WHERE last_at > known_end
        UNION ALL
        SELECT user_id, previous_period_start(known_start, tz, calendar), known_start, plan_type, monthly_minutes_limit,
               CAST(:now AS timestamptz)
        FROM plan WHERE first_at < known_start
    )
    INSERT INTO usage_periods (user_id, period_start, period_end, plan_type, monthly_minutes_limit, limit_ms,
                               archived_at)
    SELECT user_id, period_start, period_end, plan_type, monthly_minutes_limit, monthly_minutes_limit::bigint * 60000,
           archived_at
    FROM missing
    ORDER BY user_id, period_start
    ON CONFLICT (user_id, period_start) DO NOTHING
    RETURNING user_id
    """
)


def _span_params(spans: Mapping[str, Span]) -> dict[str, str]:
    user_ids = sorted(spans)
    return {
        "user_ids": bare_array(user_ids),
        "firsts": time_array(spans[user_id].first for user_id in user_ids),
        "lasts": time_array(spans[user_id].last for user_id in user_ids),
    }


@dataclass(frozen=True)
class PeriodPlan:
    """The plan of the periods a user's subscription is about to run in, before its row says so."""

    plan: str
    monthly_minutes: int
    calendar: bool  # calendar months (free plan), else periods of a month from the start


def _plan_params(plans: Mapping[str, PeriodPlan]) -> dict[str, str]:
    user_ids = sorted(plans)
    return {
        "plan_users": bare_array(user_ids),
        "plan_types": array_literal(plans[user_id].plan for user_id in user_ids),
        "plan_minutes": bare_array([plans[user_id].monthly_minutes for user_id in user_ids]),
        "plan_calendars": array_literal("t" if plans[user_id].calendar else "f" for user_id in user_ids),
    }


def ensure_periods(
    conn: Connection, spans: Mapping[str, Span], now: datetime, plans: Mapping[str, PeriodPlan] | None = None
) -> None:
    """Make sure every user has a subscription row and usage_periods rows covering their span of usage.
    Periods that have to be predicted take the plan of the user's subscription row, or `plans`."""
    if not spans:
        return
    params = _span_params(spans)
    free_minutes = settings().plan_minutes["free"]
    conn.execute(_CREATE_FREE_SUBSCRIPTIONS, {"user_ids": params["user_ids"], "now": now, "free_minutes": free_minutes})
    conn.execute(_CREATE_CURRENT_PERIODS, {"user_ids": params["user_ids"]})
    extend = {**params, **_plan_params(plans or {}), "now": now}
    for _ in range(MAX_PERIOD_STEPS):
        if conn.execute(_EXTEND_PERIODS, extend).first() is None:
            return
    raise RuntimeError(f"usage spans more than {MAX_PERIOD_STEPS} periods for some of {len(spans)} users")


@dataclass(frozen=True)
class Period:
    id: int
    user_id: str
    start: datetime
    end: datetime
    limit_ms: int


def periods_overlapping(conn: Connection, spans: Mapping[str, Span]) -> dict[str, list[Period]]:
    """Each user's periods that overlap their span, in time order (none for a user without a
    subscription row: `ensure_periods` gives them one first)."""
    rows = conn.execute(
        sa.text(
            """
            SELECT u.id, u.user_id::text, u.period_start, u.period_end, u.limit_ms
            FROM unnest(CAST(:user_ids AS uuid[]), CAST(:firsts AS timestamptz[]), CAST(:lasts AS timestamptz[]))
                 AS w(user_id, first_at, last_at)
            JOIN usage_periods u ON u.user_id = w.user_id AND u.period_start < w.last_at AND u.period_end > w.first_at
            WHERE EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = w.user_id)
            ORDER BY u.user_id, u.period_start
            """
        ),
        _span_params(spans),
    )
    periods: dict[str, list[Period]] = {}
    for row in rows:
        periods.setdefault(row[1], []).append(Period(row[0], row[1], row[2], row[3], row[4]))
    return periods


def spans_of(intervals: Iterable[tuple[str, datetime, datetime]]) -> dict[str, Span]:
    """Per user, the smallest span covering all of their (user_id, start, end) intervals."""
    spans: dict[str, Span] = {}
    for user_id, start, end in intervals:
        span = spans.get(user_id)
        spans[user_id] = Span(start, end) if span is None else Span(min(span.first, start), max(span.last, end))
    return spans


# -- moving subscriptions between periods ------------------------------------------------------------------

RESET_BATCH = 500  # subscriptions moved per statement round; each round commits nothing by itself

_DUE_USERS = sa.text(
    """
    SELECT user_id::text FROM subscriptions
    WHERE current_period_end <= :now
      AND (CAST(:user_ids AS uuid[]) IS NULL OR user_id = ANY(CAST(:user_ids AS uuid[])))
    ORDER BY user_id
    """
)

# The lock order puts usage_periods before subscriptions, and metering holds period rows while it waits
# for the subscription. So the period rows a move writes (the open ones up to the new start) are locked
# first, without waiting; users with a row held elsewhere are returned as busy and left for a later pass.
# A reset therefore never waits for a row lock, and so can never be half of a deadlock.
_LOCK_PERIODS = sa.text(
    """
    WITH touched AS (
        SELECT u.id, u.user_id
        FROM subscriptions s JOIN usage_periods u ON u.user_id = s.user_id
        WHERE s.user_id = ANY(CAST(:user_ids AS uuid[])) AND s.current_period_end <= :now
          AND u.archived_at IS NULL AND u.period_start <= s.current_period_end
    ), locked AS MATERIALIZED (
        SELECT id FROM usage_periods WHERE id IN (SELECT id FROM touched) ORDER BY id FOR UPDATE SKIP LOCKED
    )
    SELECT DISTINCT user_id::text FROM touched WHERE id NOT IN (SELECT id FROM locked)
    """
)

_DUE = sa.text(
    """
    SELECT s.user_id::text AS user_id, s.current_period_end AS new_start,
           next_period_end(s.current_period_end, worker_timezone(p.timezone),
                           s.stripe_subscription_id IS NULL OR s.plan_type = 'free') AS new_end,
           s.plan_type, s.monthly_minutes_limit
    FROM subscriptions s JOIN profiles p ON p.id = s.user_id
    WHERE s.current_period_end <= :now AND s.user_id = ANY(CAST(:user_ids AS uuid[]))
    ORDER BY s.user_id
    FOR UPDATE OF s SKIP LOCKED
    """
)

# Start (or find, when usage already created it) each user's period at :starts and archive every earlier
# open period; _MOVE also points the subscription at it with the usage it already holds.
_START_PERIODS = """
    moves AS (
        SELECT * FROM unnest(CAST(:user_ids AS uuid[]), CAST(:starts AS timestamptz[]), CAST(:ends AS timestamptz[]),
                             CAST(:plans AS text[]), CAST(:minutes AS int[]))
                 AS m(user_id, period_start, period_end, plan_type, minutes)
    ), started AS (
        INSERT INTO usage_periods AS u (user_id, period_start, period_end, plan_type, monthly_minutes_limit, limit_ms)
        SELECT user_id, period_start, period_end, plan_type, minutes, minutes::bigint * 60000 FROM moves
        ORDER BY user_id
        ON CONFLICT (user_id, period_start) DO UPDATE
            SET period_end = CASE WHEN :authoritative THEN EXCLUDED.period_end ELSE u.period_end END,
                plan_type = EXCLUDED.plan_type,
                monthly_minutes_limit = EXCLUDED.monthly_minutes_limit,
                limit_ms = EXCLUDED.limit_ms
        RETURNING u.user_id, u.period_start, u.period_end, u.used_ms, u.limit_ms
    ), archived AS (
        UPDATE usage_periods u SET archived_at = :now
        FROM moves m
        WHERE u.user_id = m.user_id AND u.period_start < m.period_start AND u.archived_at IS NULL
        RETURNING u.id
    ), unrecorded AS (
        -- The subscription's period has no row at all (the app wrote the subscription itself): it is
        -- archived now, with its usage counted from the ledger, so the history has no hole.
        INSERT INTO usage_periods (user_id, period_start, period_end, plan_type, monthly_minutes_limit, limit_ms,
                                   used_ms, archived_at)
        SELECT s.user_id, s.current_period_start, s.current_period_end, s.plan_type, s.monthly_minutes_limit,
               s.monthly_minutes_limit::bigint * 60000, ledger_ms(s.user_id, s.current_period_start,
                                                               s.current_period_end, :longest), :now
        FROM subscriptions s JOIN moves m ON m.user_id = s.user_id
        WHERE s.current_period_start < m.period_start
          AND NOT EXISTS (SELECT 1 FROM usage_periods u WHERE u.user_id = s.user_id
                          AND u.period_start < s.current_period_end AND u.period_end > s.current_period_start)
        ORDER BY s.user_id
        ON CONFLICT (user_id, period_start) DO NOTHING
        RETURNING id
    )
"""

_MOVE = sa.text(
    f"""
    WITH {_START_PERIODS}
    UPDATE subscriptions s
    SET current_period_start = n.period_start,
        current_period_end = n.period_end,
        reset_date = (n.period_end AT TIME ZONE worker_timezone(p.timezone))::date,
        plan_type = m.plan_type,
        monthly_minutes_limit = m.minutes,
        monthly_minutes_used = n.used_ms / 60000,
        limit_reached_at = CASE WHEN n.used_ms >= n.limit_ms THEN COALESCE(
                                CASE WHEN s.current_period_start = n.period_start THEN s.limit_reached_at END, :now)
                           END
    FROM started n JOIN moves m ON m.user_id = n.user_id JOIN profiles p ON p.id = n.user_id
    WHERE s.user_id = n.user_id
    RETURNING s.user_id::text, (SELECT count(*) FROM archived) + (SELECT count(*) FROM unrecorded) AS archived_count
    """
)

# The data-modifying CTEs run whether or not the query reads them.
_START = sa.text(f"WITH {_START_PERIODS} SELECT count(*) AS archived_count FROM archived")


@dataclass(frozen=True)
class PeriodStart:
    user_id: str
    start: datetime
    end: datetime
    plan: str
    monthly_minutes: int


def _move_params(starts: list[PeriodStart], now: datetime, authoritative: bool) -> dict[str, object]:
    return {
        "user_ids": bare_array([s.user_id for s in starts]),
        "starts": time_array(s.start for s in starts),
        "ends": time_array(s.end for s in starts),
        "plans": array_literal(s.plan for s in starts),
        "minutes": bare_array([s.monthly_minutes for s in starts]),
        "now": now,
        "authoritative": authoritative,
        "longest": timedelta(seconds=settings().usage_max_event_seconds),
    }


def move_to_periods(conn: Connection, starts: list[PeriodStart], now: datetime, authoritative: bool) -> int:
    """Point each user's subscription at the given period (created when missing) and archive earlier
    open periods. `authoritative` bounds (Stripe's) overwrite a predicted period's end; predicted ones
    (a reset computing the next calendar month) keep an end already stored. Returns periods archived."""
    if not starts:
        return 0
    rows = conn.execute(_MOVE, _move_params(sorted(starts, key=lambda s: s.user_id), now, authoritative)).all()
    return rows[0].archived_count if rows else 0


def start_periods(conn: Connection, starts: list[PeriodStart], now: datetime, authoritative: bool) -> int:
    """`move_to_periods` for the usage periods alone: the caller writes the subscription rows itself."""
    if not starts:
        return 0
    params = _move_params(sorted(starts, key=lambda s: s.user_id), now, authoritative)
    return int(conn.execute(_START, params).scalar_one())


@dataclass
class ResetResult:
    users: set[str]
    periods_archived: int
    busy: set[str] = field(default_factory=set)  # still due: another transaction held their rows


def advance_due(conn: Connection, now: datetime, user_ids: list[str] | None = None) -> ResetResult:
    """Move every subscription whose period ended by `now` to its next period, one period at a time, so a
    reset that runs months late archives each missed period: each pass moves every due user one period,
    until a pass moves nobody. Rows locked by another transaction are skipped, never waited for (a
    concurrent run moves them, or the next run does), so two runs at once never move one subscription
    twice and a reset never deadlocks with metering."""
    result = ResetResult(set(), 0)
    while True:
        due = list(conn.execute(_DUE_USERS, {"now": now, "user_ids": user_ids}).scalars())
        moved = 0
        for first in range(0, len(due), RESET_BATCH):
            chunk = due[first : first + RESET_BATCH]
            busy = set(conn.execute(_LOCK_PERIODS, {"now": now, "user_ids": chunk}).scalars())
            ready = [user_id for user_id in chunk if user_id not in busy]
            rows = conn.execute(_DUE, {"now": now, "user_ids": ready}).all() if ready else []
            moves = [PeriodStart(row.user_id, row.new_start, row.new_end, row.plan_type, row.monthly_minutes_limit)
                     for row in rows]  # fmt: skip
            result.periods_archived += move_to_periods(conn, moves, now, authoritative=False)
            result.users.update(move.user_id for move in moves)
            moved += len(moves)
        if not moved:
            result.busy = set(due)
            return result
