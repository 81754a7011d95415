"""A no-op task on the worker's own Celery app, for the benchmark only (`celery -A worker worker --include
bench.noop`): the same broker, queues, acknowledgement and prefetch settings as production, no work, so
its throughput is the ceiling Celery itself sets on this machine."""

from __future__ import annotations

from typing import Any

from worker.celery import app

NOOP_TASK = "bench.noop"


@app.task(name=NOOP_TASK, acks_late=True)
def noop(*_args: Any, **_kwargs: Any) -> None:
    """Nothing: the message is received, run in a pool process and acknowledged, as a usage event is."""
