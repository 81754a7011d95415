"""Stripe tasks: `stripe.process_event(event_id)` applies one stored webhook event, `stripe.reconcile(since)`
repairs what missed webhooks left behind (worker/stripe/)."""

from __future__ import annotations

from typing import Any

from worker.celery import app
from worker.clock import parse_moment, utcnow
from worker.dead_letters import Letter, Rejected, storable_text
from worker.logs import get_logger
from worker.stripe import inbox
from worker.stripe import reconcile as stripe_reconcile
from worker.stripe.webhook import TASK_NAME
from worker.tasks.base import WorkerTask

log = get_logger(__name__)


@app.task(name=TASK_NAME, base=WorkerTask, bind=True)
def process_event(self: WorkerTask, event_id: Any) -> None:
    def letters(reason: str) -> list[Letter]:
        return [Letter("stripe", {"id": event_id}, reason, storable_text(event_id), self.name)]

    with self.dead_lettering(letters):
        if not isinstance(event_id, str) or not event_id:
            raise Rejected(f"event_id must be the id of a stored Stripe event, got {event_id!r:.100}")
        inbox.process_apart(event_id, utcnow())


@app.task(name=stripe_reconcile.TASK_NAME, base=WorkerTask, bind=True)
def reconcile(self: WorkerTask, since: str | None = None) -> dict[str, Any]:
    """Events created from `since` (ISO-8601 with an offset; default: Stripe's 30-day event window)."""
    try:
        start = parse_moment(since) if since is not None else None
    except (TypeError, ValueError) as exc:
        reason = f"since must be an ISO-8601 time with a UTC offset, got {since!r} ({exc})"
        log.error("stripe_reconcile_rejected", task=self.name, reason=reason)
        raise ValueError(reason) from exc
    return self.retrying(lambda: stripe_reconcile.run(start, utcnow())).as_dict()
