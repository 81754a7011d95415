"""Stripe task: `stripe.process_event(event_id)` applies one stored webhook event (worker/stripe_sync.py)."""

from __future__ import annotations

from typing import Any

from worker import db, stripe_sync
from worker.celery import app
from worker.clock import utcnow
from worker.dead_letters import Letter, Rejected, storable_text
from worker.logs import get_logger
from worker.tasks.base import WorkerTask

log = get_logger(__name__)


def _count_failed_try(event_id: str, exc: Exception) -> None:
    """Record the failure on the inbox row (the try's own transaction rolled back). Best effort: when even
    this fails, the task's retry or the sweep still comes back to the row."""
    try:
        with db.transaction() as conn:
            stripe_sync.record_failure(conn, event_id, f"{type(exc).__name__}: {exc}", utcnow())
    except Exception as record_exc:
        log.warning("stripe_failure_not_recorded", event_id=event_id, error=str(record_exc))


@app.task(name=stripe_sync.TASK_NAME, base=WorkerTask, bind=True)
def process_event(self: WorkerTask, event_id: Any) -> None:
    def letters(reason: str) -> list[Letter]:
        return [Letter("stripe", {"id": event_id}, reason, storable_text(event_id), self.name)]

    with self.dead_lettering(letters):
        if not isinstance(event_id, str) or not event_id:
            raise Rejected(f"event_id must be the id of a stored Stripe event, got {event_id!r:.100}")
        try:
            with db.transaction() as conn:
                stripe_sync.process(conn, event_id, utcnow())
        except Rejected:
            raise
        except Exception as exc:
            _count_failed_try(event_id, exc)
            raise
