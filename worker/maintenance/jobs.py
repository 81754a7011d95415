"""The beat jobs: monthly resets, partitions ahead, the statistics view, usage rolled into learning progress,
and the Stripe inbox sweep. Each is a plain function of a connection and `now`, and a `run_*` that runs it
through the job runner (worker.maintenance.runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, periods, quota, sessions
from worker.logs import get_logger
from worker.maintenance import progress
from worker.maintenance.runner import JobRun, is_lock_timeout, run_job, set_lock_timeout
from worker.stripe import inbox

log = get_logger(__name__)


# -- maintenance.reset_monthly_usage ---------------------------------------------------------------------


def reset_monthly_usage(conn: Connection, now: datetime) -> periods.ResetResult:
    """Archive every period that has ended by `now` and start the next one (periods.advance_due); the moved
    users' new quotas are read in the same transaction and published once it commits."""
    moved = periods.advance_due(conn, now)
    if moved.busy:
        log.info("usage_reset_deferred", users=len(moved.busy), reason="rows held by another transaction")
    if moved.users:
        answers = list(quota.read(conn, moved.users, now).values())
        db.after_commit(conn, lambda: quota.publish(answers))
    return moved


def _describe_reset(moved: periods.ResetResult) -> dict:
    return {
        "users_moved": len(moved.users),
        "periods_archived": moved.periods_archived,
        "users_deferred": len(moved.busy),
    }


def run_reset_monthly_usage(now: datetime, wait: bool = False) -> JobRun[periods.ResetResult]:
    return run_job("reset_monthly_usage", lambda conn: reset_monthly_usage(conn, now), _describe_reset, wait=wait)


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
    set_lock_timeout(conn, PARTITION_LOCK_TIMEOUT_MS)
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
            set_lock_timeout(conn, REFRESH_LOCK_TIMEOUT_MS)
            conn.execute(sa.text("SELECT refresh_user_statistics()"))
    except sa.exc.DBAPIError as exc:
        if not is_lock_timeout(exc):
            raise
        log.info("user_statistics_refresh_skipped", reason="another refresh of the view is running")
        return Refresh("skipped")
    return Refresh("concurrently" if populated else "populated")


def run_refresh_materialized_views() -> JobRun[Refresh]:
    return run_job("refresh_materialized_views", refresh_materialized_views, lambda refresh: {"mode": refresh.mode})


def run_aggregate_usage(now: datetime) -> JobRun[progress.Aggregation]:
    return run_job(
        "aggregate_usage",
        lambda conn: progress.aggregate_usage(conn, now),
        lambda result: {
            "hours": result.hours,
            "users": len(result.users),
            "minutes": result.minutes,
            "achievements": result.achievements,
        },
    )


# -- maintenance.sweep -----------------------------------------------------------------------------------


def run_sweep(now: datetime) -> JobRun[inbox.SweepResult]:
    """The Stripe inbox's sweep in the job's transaction; the events it found are queued once that has committed."""
    return run_job(
        "sweep",
        lambda conn: inbox.sweep(conn, now),
        lambda swept: {"requeued": len(swept.requeue), "dead_lettered": len(swept.dead_lettered)},
    )


# -- sessions.expire -------------------------------------------------------------------------------------


def run_expire_sessions(now: datetime) -> JobRun[sessions.Expired]:
    """sessions.expire in the job's transaction; the grants of the sessions it ended return once committed."""
    return run_job(
        "expire_sessions", lambda conn: sessions.expire(conn, now), lambda expired: {"expired": expired.count}
    )
