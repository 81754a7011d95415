"""The job runner every periodic job goes through: one transaction under the job's advisory lock, and the
run recorded in `maintenance_runs`.

Each job gets one transaction that starts with the job's transaction-level advisory lock, so two beats, a
manual run and a late run never do one job's work at the same time; the lock ends with the transaction,
also when the process dies. Beat-started runs skip when the lock is taken: the run holding it does the
same work, the next tick comes soon, and waiting would only tie up a worker and a connection. An
operator's `python -m worker reset-due` waits instead: it was asked for that run's effect, and the wait
is as long as the run in progress. Exactly-once does not rest on the lock alone: every job is idempotent
at the row level as well (SKIP LOCKED, ON CONFLICT, deltas), for callers that bypass the runner.

Each run is recorded in `maintenance_runs`: its start in a transaction of its own (visible while it runs),
its success in the job's own transaction (recorded if and only if the work commits), a failure after the
rollback. Times there are the worker's clock; the business time a job works for is its explicit `now`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from worker import db
from worker.clock import utcnow
from worker.logs import get_logger
from worker.tables import maintenance_runs

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


def _record_run(conn: Connection, job: str, **values: Any) -> None:
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
                _record_run(own, job, last_started_at=utcnow())
            result = work(conn)
            _record_run(conn, job, last_succeeded_at=utcnow(), last_duration_ms=_elapsed_ms(clock), last_error=None)
    except Exception as exc:
        if started:
            _record_failure(job, clock, exc)
        raise
    summary = describe(result)
    log.info("maintenance_done", job=job, duration_ms=_elapsed_ms(clock), **summary)
    return JobRun(job, ran=True, result=result, summary=summary)


@contextmanager
def recorded_run(job: str) -> Iterator[None]:
    """Record in maintenance_runs, as run_job does, a job that runs its own transactions (stripe.reconcile,
    which must not hold one across Stripe's API)."""
    clock = time.monotonic()
    with db.transaction() as conn:
        _record_run(conn, job, last_started_at=utcnow())
    try:
        yield
    except Exception as exc:
        _record_failure(job, clock, exc)
        raise
    with db.transaction() as conn:
        _record_run(conn, job, last_succeeded_at=utcnow(), last_duration_ms=_elapsed_ms(clock), last_error=None)


def _record_failure(job: str, clock: float, exc: Exception) -> None:
    error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    log.error("maintenance_failed", job=job, error=error)
    try:
        with db.transaction() as conn:
            _record_run(conn, job, last_duration_ms=_elapsed_ms(clock), last_error=error)
    except Exception:
        log.exception("maintenance_failure_not_recorded", job=job)


def set_lock_timeout(conn: Connection, milliseconds: int) -> None:
    """Give up on a lock after this long, for the rest of the transaction: a job that queues behind a long
    transaction for a strong lock would block every later reader of that table."""
    db.set_local(conn, "lock_timeout", f"{milliseconds}ms")


def is_lock_timeout(exc: sa.exc.DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE
