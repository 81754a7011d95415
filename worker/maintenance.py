"""Periodic jobs: monthly resets, partitions ahead, the statistics view, usage rolled into learning progress,
the Stripe inbox sweep, the end of silent live sessions; and the runner they all go through.

The runner (`run_job`) gives each job one transaction that starts with the job's transaction-level advisory
lock, so two beats, a manual run and a late run never do one job's work at the same time; the lock ends
with the transaction, also when the process dies. Beat-started runs skip when the lock is taken: the run
holding it does the same work, the next tick comes soon, and waiting would only tie up a worker and a
connection. An operator's `python -m worker reset-due` waits instead: it was asked for that run's effect,
and the wait is as long as the run in progress. Exactly-once does not rest on the lock alone: every job is
idempotent at the row level as well (SKIP LOCKED, ON CONFLICT, deltas), for callers that bypass the runner.

Each run is recorded in `maintenance_runs`: its start in a transaction of its own (visible while it runs),
its success in the job's own transaction (recorded if and only if the work commits), a failure after the
rollback. Times there are the worker's clock; the business time a job works for is its explicit `now`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from worker import db, periods, quota, sessions, stripe_sync
from worker.logs import get_logger
from worker.tables import maintenance_runs
from worker.tasks.base import utcnow

log = get_logger(__name__)

T = TypeVar("T")

MAX_ERROR_CHARS = 2000
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout


# -- the job runner --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRun(Generic[T]):
    job: str
    ran: bool  # False: another run held the job's lock, so this one did nothing
    result: T | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "ran": self.ran, **self.summary}


_TRY_LOCK = sa.text("SELECT pg_try_advisory_xact_lock(hashtext(:key))")
_WAIT_LOCK = sa.text("SELECT true FROM (SELECT pg_advisory_xact_lock(hashtext(:key))) AS waited_for_it")


def _take_lock(conn: Connection, job: str, wait: bool) -> bool:
    return bool(conn.execute(_WAIT_LOCK if wait else _TRY_LOCK, {"key": f"worldspeak:maintenance:{job}"}).scalar())


def _record(conn: Connection, job: str, **values: Any) -> None:
    statement = pg_insert(maintenance_runs).values(job=job, **values)
    conn.execute(statement.on_conflict_do_update(index_elements=[maintenance_runs.c.job], set_=values))


def _elapsed_ms(clock: float) -> int:
    return round((time.monotonic() - clock) * 1000)


def run_job(job: str, work: Callable[[Connection], T], describe: Callable[[T], dict], wait: bool = False) -> JobRun[T]:
    """Run `work` in one transaction under the job's advisory lock (skip when it is taken, or wait for it
    with `wait`), recording the run in maintenance_runs. Exceptions propagate after being recorded."""
    clock = time.monotonic()
    started = False
    try:
        with db.transaction() as conn:
            if not _take_lock(conn, job, wait):
                log.info("maintenance_skipped", job=job, reason="another run of this job holds its lock")
                return JobRun(job, ran=False)
            started = True
            with db.transaction() as own:  # committed now, so operators see the run while it lasts
                _record(own, job, last_started_at=utcnow())
            result = work(conn)
            _record(conn, job, last_succeeded_at=utcnow(), last_duration_ms=_elapsed_ms(clock), last_error=None)
    except Exception as exc:
        if started:
            _record_failure(job, clock, exc)
        raise
    summary = describe(result)
    log.info("maintenance_done", job=job, duration_ms=_elapsed_ms(clock), **summary)
    return JobRun(job, ran=True, result=result, summary=summary)


def _record_failure(job: str, clock: float, exc: Exception) -> None:
    error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    log.error("maintenance_failed", job=job, error=error)
    try:
        with db.transaction() as conn:
            _record(conn, job, last_duration_ms=_elapsed_ms(clock), last_error=error)
    except Exception:
        log.exception("maintenance_failure_not_recorded", job=job)


def _set_lock_timeout(conn: Connection, milliseconds: int) -> None:
    """Give up on a lock after this long, for the rest of the transaction: a job that queues behind a long
    transaction for a strong lock would block every later reader of that table."""
    conn.execute(sa.text("SELECT set_config('lock_timeout', :value, true)"), {"value": f"{milliseconds}ms"})


def _is_lock_timeout(exc: sa.exc.DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


# -- maintenance.reset_monthly_usage ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reset:
    moved: periods.ResetResult
    quotas: dict[str, quota.Quota]  # the moved users' quotas, published once the reset has committed


def reset_monthly_usage(conn: Connection, now: datetime) -> Reset:
    """Archive every period that has ended by `now` and start the next one (periods.advance_due), and read
    the moved users' new quotas in the same transaction."""
    moved = periods.advance_due(conn, now)
    if moved.busy:
        log.info("usage_reset_deferred", users=len(moved.busy), reason="rows held by another transaction")
    return Reset(moved, quota.read(conn, moved.users, now) if moved.users else {})


def _describe_reset(reset: Reset) -> dict:
    moved = reset.moved
    return {
        "users_moved": len(moved.users),
        "periods_archived": moved.periods_archived,
        "users_deferred": len(moved.busy),
    }


def run_reset_monthly_usage(now: datetime, wait: bool = False) -> JobRun[Reset]:
    run = run_job("reset_monthly_usage", lambda conn: reset_monthly_usage(conn, now), _describe_reset, wait=wait)
    if run.ran:
        quota.publish(run.result.quotas.values())
    return run


# -- maintenance.ensure_partitions -----------------------------------------------------------------------

MAX_MONTHS_AHEAD = 120
PARTITION_LOCK_TIMEOUT_MS = 5000

# create_monthly_partition (schema.sql) serialises its callers with an advisory lock and does nothing for
# a month that exists, so a partition created meanwhile by anyone else is no error.
_CREATE_PARTITIONS = sa.text(
    """
    SELECT create_monthly_partition(month::date)
    FROM generate_series(date_trunc('month', CAST(:now AS timestamptz) AT TIME ZONE 'UTC'),
                         date_trunc('month', CAST(:now AS timestamptz) AT TIME ZONE 'UTC')
                             + make_interval(months => :months_ahead),
                         INTERVAL '1 month') AS month
    WHERE to_regclass(format('public.messages_%s', to_char(month, 'YYYY_MM'))) IS NULL
    ORDER BY month
    """
)


@dataclass(frozen=True)
class Partitions:
    created: list[str]


def check_months_ahead(months_ahead: Any) -> None:
    if isinstance(months_ahead, bool) or not isinstance(months_ahead, int):
        raise ValueError(f"months_ahead must be a whole number, got {months_ahead!r}")
    if not 0 <= months_ahead <= MAX_MONTHS_AHEAD:
        raise ValueError(f"months_ahead must be between 0 and {MAX_MONTHS_AHEAD}, got {months_ahead}")


def ensure_partitions(conn: Connection, now: datetime, months_ahead: int = 3) -> Partitions:
    """Partitions of `messages` for the UTC month of `now` and the `months_ahead` months after it; rows of
    those months waiting in messages_default move into them. Returns the partitions it created."""
    check_months_ahead(months_ahead)
    _set_lock_timeout(conn, PARTITION_LOCK_TIMEOUT_MS)
    created = list(conn.execute(_CREATE_PARTITIONS, {"now": now, "months_ahead": months_ahead}).scalars())
    return Partitions(created)


def run_ensure_partitions(now: datetime, months_ahead: int = 3) -> JobRun[Partitions]:
    return run_job(
        "ensure_partitions",
        lambda conn: ensure_partitions(conn, now, months_ahead),
        lambda partitions: {"created": partitions.created},
    )


# -- maintenance.refresh_materialized_views --------------------------------------------------------------

REFRESH_LOCK_TIMEOUT_MS = 1000

_VIEW_POPULATED = sa.text("SELECT relispopulated FROM pg_class WHERE oid = 'public.user_statistics'::regclass")


@dataclass(frozen=True)
class Refresh:
    mode: str  # "concurrently", "populated" (first fill, which cannot be concurrent) or "skipped"


def refresh_materialized_views(conn: Connection) -> Refresh:
    """Refresh user_statistics without blocking its readers (refresh_user_statistics() in schema.sql fills
    an unpopulated view normally first). A refresh already running, also one started outside this job,
    holds the view's lock: this one is skipped rather than queued behind it."""
    populated = conn.execute(_VIEW_POPULATED).scalar_one()
    try:
        with conn.begin_nested():
            _set_lock_timeout(conn, REFRESH_LOCK_TIMEOUT_MS)
            conn.execute(sa.text("SELECT refresh_user_statistics()"))
    except sa.exc.DBAPIError as exc:
        if not _is_lock_timeout(exc):
            raise
        log.info("user_statistics_refresh_skipped", reason="another refresh of the view is running")
        return Refresh("skipped")
    return Refresh("concurrently" if populated else "populated")


def run_refresh_materialized_views() -> JobRun[Refresh]:
    return run_job("refresh_materialized_views", refresh_materialized_views, lambda refresh: {"mode": refresh.mode})


# -- maintenance.aggregate_usage -------------------------------------------------------------------------
#
# usage_tracking hours that have ended roll into learning progress per user and language. What is rolled
# is the difference between an hour's language_breakdown and the part already rolled (aggregated_breakdown),
# so a second run adds nothing and usage arriving late for an aggregated hour (metering adds to the hour and
# clears is_aggregated) is added by its difference only. Minutes stay exact: learning_progress keeps the
# exact total in milliseconds (total_study_ms), and both minute totals grow by the whole minutes that total
# gained (floor(new ms / 60000) - floor(old ms / 60000)); adding each hour's own rounded minutes would lose
# up to a minute per hour. Days and weeks are the user's (profiles.timezone, UTC when unset or unknown); an
# hour counts for the local day in which it starts (in zones with a half-hour offset, the half hour after
# local midnight is counted with the day before, as hours are the finest unit usage_tracking keeps).
# consecutive_days is the run of study days ending at last_study_date; usage arriving for a day before
# last_study_date counts its minutes but does not rebuild an earlier streak.

AGGREGATE_BATCH = 5000  # hour rows per round

_ROLL_UP_HOURS = sa.text(
    """
    WITH due AS (
        SELECT t.id, t.user_id, t.aggregated_breakdown
        FROM usage_tracking t
        WHERE NOT t.is_aggregated AND t.date <= :today
          AND (t.date + make_interval(hours => t.hour + 1)) AT TIME ZONE 'UTC' <= :now
        ORDER BY t.user_id, t.date, t.hour
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    )
    UPDATE usage_tracking t
    SET aggregated_ms = t.microphone_ms,
        aggregated_breakdown = COALESCE(t.language_breakdown, '{}'::jsonb),
        is_aggregated = true
    FROM due d JOIN profiles p ON p.id = d.user_id
    WHERE t.id = d.id
    RETURNING t.user_id::text AS user_id,
              ((t.date + make_interval(hours => t.hour)) AT TIME ZONE 'UTC'
                  AT TIME ZONE worker_timezone(p.timezone))::date AS study_date,
              t.language_breakdown::text AS breakdown, d.aggregated_breakdown::text AS rolled_before
    """
)

# The new run of study days (run_days days ending at last_date) continues the stored streak when it
# reaches back to the day after last_study_date; otherwise it is the streak. weekly_achieved_minutes is
# recomputed from this week's rolled-up hours, so it is exact and starts again every local Monday.
_ADD_TO_PROGRESS = sa.text(
    """
    WITH studied AS (
        SELECT * FROM unnest(CAST(:user_ids AS uuid[]), CAST(:languages AS text[]), CAST(:ms AS bigint[]),
                             CAST(:last_dates AS date[]), CAST(:run_days AS int[]))
                 AS s(user_id, language_code, ms, last_date, run_days)
    ), weeks AS (
        SELECT s.user_id, s.language_code,
               date_trunc('week', CAST(:now AS timestamptz) AT TIME ZONE z.tz) AT TIME ZONE z.tz AS week_start,
               (date_trunc('week', CAST(:now AS timestamptz) AT TIME ZONE z.tz) + INTERVAL '7 days')
                   AT TIME ZONE z.tz AS week_end
        FROM studied s JOIN profiles p ON p.id = s.user_id
        CROSS JOIN LATERAL (SELECT worker_timezone(p.timezone) AS tz) z
    ), this_week AS (
        SELECT w.user_id, w.language_code,
               (COALESCE(sum((t.aggregated_breakdown ->> w.language_code)::numeric), 0) * 1000)::bigint AS ms
        FROM weeks w
        LEFT JOIN usage_tracking t
            ON t.user_id = w.user_id
           AND t.date BETWEEN (w.week_start AT TIME ZONE 'UTC')::date AND (w.week_end AT TIME ZONE 'UTC')::date
           AND (t.date + make_interval(hours => t.hour)) AT TIME ZONE 'UTC' >= w.week_start
           AND (t.date + make_interval(hours => t.hour)) AT TIME ZONE 'UTC' < w.week_end
        GROUP BY w.user_id, w.language_code
    )
    INSERT INTO learning_progress AS lp (user_id, language_code, total_study_ms, total_study_time_minutes,
                                         last_study_date, consecutive_days, weekly_achieved_minutes,
                                         created_at, updated_at)
    SELECT s.user_id, s.language_code, s.ms, s.ms / 60000, s.last_date, s.run_days, w.ms / 60000, :now, :now
    FROM studied s JOIN this_week w ON w.user_id = s.user_id AND w.language_code = s.language_code
    ORDER BY s.user_id, s.language_code
    ON CONFLICT (user_id, language_code) DO UPDATE SET
        total_study_ms = lp.total_study_ms + EXCLUDED.total_study_ms,
        total_study_time_minutes = COALESCE(lp.total_study_time_minutes, 0)
            + (lp.total_study_ms + EXCLUDED.total_study_ms) / 60000 - lp.total_study_ms / 60000,
        consecutive_days = CASE
            WHEN lp.last_study_date IS NULL THEN EXCLUDED.consecutive_days
            WHEN EXCLUDED.last_study_date <= lp.last_study_date THEN lp.consecutive_days
            WHEN EXCLUDED.last_study_date - EXCLUDED.consecutive_days <= lp.last_study_date
                THEN GREATEST(lp.consecutive_days, 1) + (EXCLUDED.last_study_date - lp.last_study_date)
            ELSE EXCLUDED.consecutive_days
        END,
        last_study_date = GREATEST(lp.last_study_date, EXCLUDED.last_study_date),
        weekly_achieved_minutes = EXCLUDED.weekly_achieved_minutes,
        updated_at = EXCLUDED.updated_at
    RETURNING lp.user_id::text AS user_id, lp.language_code, lp.total_study_ms, lp.consecutive_days
    """
)

# A language the user had no settings for starts at the level their profile names, else 'beginner'.
_ADD_TO_LANGUAGE_SETTINGS = sa.text(
    """
    INSERT INTO language_settings AS ls (user_id, language_code, proficiency_level, total_learning_minutes,
                                         created_at, updated_at)
    SELECT a.user_id, a.language_code,
           CASE WHEN p.proficiency_levels ->> a.language_code
                     IN ('beginner', 'elementary', 'intermediate', 'advanced', 'native')
                THEN p.proficiency_levels ->> a.language_code ELSE 'beginner' END,
           a.minutes, :now, :now
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:languages AS text[]), CAST(:minutes AS int[]))
         AS a(user_id, language_code, minutes)
    JOIN profiles p ON p.id = a.user_id
    ORDER BY a.user_id, a.language_code
    ON CONFLICT (user_id, language_code) DO UPDATE SET
        total_learning_minutes = COALESCE(ls.total_learning_minutes, 0) + EXCLUDED.total_learning_minutes,
        updated_at = EXCLUDED.updated_at
    WHERE EXCLUDED.total_learning_minutes > 0
    """
)

# As check_achievements() in schema.sql does for FIRST_CONV: earned once; a row prepared as not yet
# earned becomes earned.
_EARN_ACHIEVEMENTS = sa.text(
    """
    INSERT INTO achievements AS a (user_id, achievement_type, achievement_code, name, description, criteria,
                                   progress, category, tier, is_earned, earned_at, created_at)
    SELECT e.user_id, 'streak', e.code, e.name, e.description, e.criteria, 100.0, 'streak', e.tier, TRUE, :now, :now
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:codes AS text[]), CAST(:names AS jsonb[]),
                CAST(:descriptions AS jsonb[]), CAST(:criteria AS jsonb[]), CAST(:tiers AS text[]))
         AS e(user_id, code, name, description, criteria, tier)
    ORDER BY e.user_id, e.code
    ON CONFLICT (user_id, achievement_code) DO UPDATE SET
        is_earned = TRUE, earned_at = EXCLUDED.earned_at, progress = EXCLUDED.progress
    WHERE a.is_earned IS NOT TRUE
    RETURNING a.user_id
    """
)

# A learner who has not studied since the local week began achieved nothing in it yet.
_START_NEW_WEEKS = sa.text(
    """
    UPDATE learning_progress lp SET weekly_achieved_minutes = 0, updated_at = :now
    FROM profiles p
    WHERE p.id = lp.user_id AND lp.weekly_achieved_minutes <> 0
      AND lp.last_study_date
          < (date_trunc('week', CAST(:now AS timestamptz) AT TIME ZONE worker_timezone(p.timezone)))::date
    """
)


@dataclass(frozen=True)
class Streak:
    days: int
    code: str
    name: dict[str, str]
    description: dict[str, str]
    tier: str


STREAKS = (
    Streak(7, "STREAK_7", {"en": "7-Day Streak", "ja": "7日連続学習"},
           {"en": "Study 7 days in a row", "ja": "7日間連続で学習"}, "bronze"),
    Streak(30, "STREAK_30", {"en": "30-Day Streak", "ja": "30日連続学習"},
           {"en": "Study 30 days in a row", "ja": "30日間連続で学習"}, "silver"),
)  # fmt: skip


@dataclass
class Studied:
    """One user's new study time in one language: milliseconds and the local days they fell on."""

    ms: int = 0
    days: set[date] = field(default_factory=set)

    def run_days(self) -> int:
        """Length of the run of consecutive days ending at the last day."""
        last, length = max(self.days), 1
        while last - timedelta(days=length) in self.days:
            length += 1
        return length


@dataclass
class Aggregation:
    hours: int = 0
    users: set[str] = field(default_factory=set)
    minutes: int = 0
    achievements: int = 0


def _milliseconds(seconds: Any) -> int:
    """JSON seconds (at most three decimals, read as Decimal) as whole milliseconds."""
    return int(Decimal(seconds) * 1000)


def _breakdown(text: str | None) -> dict[str, Any]:
    value = json.loads(text, parse_float=Decimal) if text else {}
    return value if isinstance(value, dict) else {}


def _studied(rows: Iterable[sa.Row]) -> dict[tuple[str, str], Studied]:
    """Per (user, language): the milliseconds the rows hold beyond what was rolled up before."""
    studied: dict[tuple[str, str], Studied] = defaultdict(Studied)
    for row in rows:
        before = _breakdown(row.rolled_before)
        for language, seconds in _breakdown(row.breakdown).items():
            ms = _milliseconds(seconds) - _milliseconds(before.get(language, 0))
            if ms > 0:  # a rebuilt hour can hold less than was rolled up: nothing is taken back
                entry = studied[row.user_id, language]
                entry.ms += ms
                entry.days.add(row.study_date)
    return studied


def _add_to_progress(conn: Connection, studied: dict[tuple[str, str], Studied], now: datetime) -> list[sa.Row]:
    keys = sorted(studied)
    return conn.execute(
        _ADD_TO_PROGRESS,
        {
            "now": now,
            "user_ids": [user_id for user_id, _ in keys],
            "languages": [language for _, language in keys],
            "ms": [studied[key].ms for key in keys],
            "last_dates": [max(studied[key].days) for key in keys],
            "run_days": [studied[key].run_days() for key in keys],
        },
    ).all()


def _add_to_language_settings(conn: Connection, minutes: dict[tuple[str, str], int], now: datetime) -> None:
    keys = sorted(minutes)
    conn.execute(
        _ADD_TO_LANGUAGE_SETTINGS,
        {
            "now": now,
            "user_ids": [user_id for user_id, _ in keys],
            "languages": [language for _, language in keys],
            "minutes": [minutes[key] for key in keys],
        },
    )


def _earn_streaks(conn: Connection, streaks: dict[str, int], now: datetime) -> int:
    earned = sorted(
        ((user_id, streak) for user_id, days in streaks.items() for streak in STREAKS if days >= streak.days),
        key=lambda pair: (pair[0], pair[1].code),
    )
    if not earned:
        return 0
    rows = conn.execute(
        _EARN_ACHIEVEMENTS,
        {
            "now": now,
            "user_ids": [user_id for user_id, _ in earned],
            "codes": [streak.code for _, streak in earned],
            "names": [json.dumps(streak.name, ensure_ascii=False) for _, streak in earned],
            "descriptions": [json.dumps(streak.description, ensure_ascii=False) for _, streak in earned],
            "criteria": [json.dumps({"consecutive_days": streak.days}) for _, streak in earned],
            "tiers": [streak.tier for _, streak in earned],
        },
    ).all()
    return len(rows)


def _roll_up_batch(conn: Connection, now: datetime, result: Aggregation) -> int:
    """Roll up one batch of finished hours; returns how many hour rows it took."""
    hours = conn.execute(
        _ROLL_UP_HOURS, {"now": now, "today": now.astimezone(UTC).date(), "batch": AGGREGATE_BATCH}
    ).all()
    studied = _studied(hours)
    result.hours += len(hours)
    if not studied:
        return len(hours)
    progress = _add_to_progress(conn, studied, now)
    minutes: dict[tuple[str, str], int] = {}
    streaks: dict[str, int] = defaultdict(int)
    for row in progress:
        added_ms = studied[row.user_id, row.language_code].ms
        minutes[row.user_id, row.language_code] = row.total_study_ms // 60000 - (row.total_study_ms - added_ms) // 60000
        streaks[row.user_id] = max(streaks[row.user_id], row.consecutive_days)
    _add_to_language_settings(conn, minutes, now)
    result.achievements += _earn_streaks(conn, streaks, now)
    result.users.update(streaks)
    result.minutes += sum(minutes.values())
    return len(hours)


def aggregate_usage(conn: Connection, now: datetime) -> Aggregation:
    """Roll the usage of hours that ended by `now` into language_settings, learning_progress and streak
    achievements, and mark those hours aggregated, all in the caller's transaction. Hour rows locked by a
    metering batch are left for the next run (metering marks them unaggregated again anyway)."""
    result = Aggregation()
    while _roll_up_batch(conn, now, result) == AGGREGATE_BATCH:
        pass
    conn.execute(_START_NEW_WEEKS, {"now": now})
    return result


def run_aggregate_usage(now: datetime) -> JobRun[Aggregation]:
    return run_job(
        "aggregate_usage",
        lambda conn: aggregate_usage(conn, now),
        lambda result: {
            "hours": result.hours,
            "users": len(result.users),
            "minutes": result.minutes,
            "achievements": result.achievements,
        },
    )


# -- maintenance.sweep -----------------------------------------------------------------------------------


def run_sweep(now: datetime) -> JobRun[stripe_sync.SweepResult]:
    """stripe_sync.sweep in the job's transaction; the events it found are queued once that has committed."""
    run = run_job(
        "sweep",
        lambda conn: stripe_sync.sweep(conn, now),
        lambda swept: {"requeued": len(swept.requeue), "dead_lettered": len(swept.dead_lettered)},
    )
    if run.ran:
        stripe_sync.enqueue(run.result.requeue)
    return run


# -- sessions.expire -------------------------------------------------------------------------------------


def run_expire_sessions(now: datetime) -> JobRun[sessions.Expired]:
    """sessions.expire in the job's transaction; the grants of the sessions it ended return once committed."""
    run = run_job(
        "expire_sessions", lambda conn: sessions.expire(conn, now), lambda expired: {"expired": expired.count}
    )
    if run.ran:
        run.result.after_commit()
    return run
