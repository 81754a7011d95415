"""Maintenance tasks, started by beat (or by hand): each parses its arguments and runs its job in
worker.maintenance, which takes the job's advisory lock and records the run in maintenance_runs.

A run that fails on a transient database error (deadlock, lost connection) is retried with backoff; any
other failure is recorded and raised, and the next scheduled run starts afresh. A malformed argument is
raised as a ValueError naming it: there is nothing to store or replay, as the job itself is the input.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from worker.celery import app
from worker.clock import parse_moment
from worker.logs import get_logger
from worker.maintenance import jobs
from worker.maintenance.runner import JobRun
from worker.tasks.base import WorkerTask

log = get_logger(__name__)


def _now(task: WorkerTask, value: Any) -> datetime:
    try:
        return parse_moment(value)
    except (TypeError, ValueError) as exc:
        reason = f"now must be an ISO-8601 time with a UTC offset, got {value!r} ({exc})"
        log.error("maintenance_rejected", task=task.name, reason=reason)
        raise ValueError(reason) from exc


def _run(task: WorkerTask, job: Callable[[], JobRun[Any]]) -> dict[str, Any]:
    return task.retrying(job).as_dict()


@app.task(name="maintenance.reset_monthly_usage", base=WorkerTask, bind=True)
def reset_monthly_usage(self: WorkerTask, now: str | None = None) -> dict[str, Any]:
    at = _now(self, now)
    return _run(self, lambda: jobs.run_reset_monthly_usage(at))


@app.task(name="maintenance.ensure_partitions", base=WorkerTask, bind=True)
def ensure_partitions(self: WorkerTask, now: str | None = None, months_ahead: int = 3) -> dict[str, Any]:
    at = _now(self, now)
    try:
        jobs.check_months_ahead(months_ahead)
    except ValueError as exc:
        log.error("maintenance_rejected", task=self.name, reason=str(exc))
        raise
    return _run(self, lambda: jobs.run_ensure_partitions(at, months_ahead))


@app.task(name="maintenance.refresh_materialized_views", base=WorkerTask, bind=True)
def refresh_materialized_views(self: WorkerTask) -> dict[str, Any]:
    return _run(self, jobs.run_refresh_materialized_views)


@app.task(name="maintenance.aggregate_usage", base=WorkerTask, bind=True)
def aggregate_usage(self: WorkerTask, now: str | None = None) -> dict[str, Any]:
    at = _now(self, now)
    return _run(self, lambda: jobs.run_aggregate_usage(at))


@app.task(name="maintenance.sweep", base=WorkerTask, bind=True)
def sweep(self: WorkerTask, now: str | None = None) -> dict[str, Any]:
    at = _now(self, now)
    return _run(self, lambda: jobs.run_sweep(at))


@app.task(name="sessions.expire", base=WorkerTask, bind=True)
def expire_sessions(self: WorkerTask, now: str | None = None) -> dict[str, Any]:
    at = _now(self, now)
    return _run(self, lambda: jobs.run_expire_sessions(at))
