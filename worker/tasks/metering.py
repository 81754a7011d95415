"""Usage tasks: `metering.record_usage_batch` (a list of events) and `metering.record_usage` (one event).

Single events are coalesced by celery-batches into one set-based transaction per flush. Three pitfalls
of celery-batches are handled here: it acknowledges every message of a flush even when the flush raised
(so the flush retries in place, and on lasting failure re-queues its events as one batch message before
returning); its flush timer dies with the broker connection (so its strategy arms a new one); and it
needs a prefetch at least as large as its batch (so its strategy raises the channel's prefetch count
when it starts, or, on RabbitMQ's quorum queues, where a consumer's prefetch is fixed when it
subscribes, the prefetch the worker subscribes with).
"""

from __future__ import annotations

from typing import Any

from celery_batches import Batches, SimpleRequest

from worker import broker, db
from worker.celery import app
from worker.config import settings
from worker.dead_letters import Letter, Rejected
from worker.logs import get_logger
from worker.metering.events import MAX_BATCH_EVENTS
from worker.metering.pipeline import apply_batch
from worker.retry import failure_reason, in_place
from worker.tasks.base import WorkerTask, write_letters

log = get_logger(__name__)

FLUSH_ATTEMPTS = 5  # in-place tries of a coalesced flush before its events are re-queued as one batch


@app.task(name="metering.record_usage_batch", base=WorkerTask, bind=True)
def record_usage_batch(self: WorkerTask, events: Any) -> None:
    def letters(reason: str) -> list[Letter]:
        return _letters(events if isinstance(events, list) else [events], reason, self.name)

    with self.dead_lettering(letters):
        if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH_EVENTS:
            raise Rejected(f"events must be a list of 1 to {MAX_BATCH_EVENTS} usage events")
        apply_batch(events, self.name)


def _letters(events: list[Any], reason: str, task_name: str) -> list[Letter]:
    return [Letter("usage", event, reason, _event_id(event), task_name) for event in events]


def _event_id(item: Any) -> str | None:
    event_id = item.get("event_id") if isinstance(item, dict) else None
    return event_id if isinstance(event_id, str) else None


class CoalescingBatches(Batches):
    """celery-batches with acknowledgement only after success and a prefetch that lets batches fill."""

    _tref: Any  # celery-batches': the flush timer's entry, or None

    def Strategy(self, task: Batches, app: Any, consumer: Any) -> Any:
        # Called again after every reconnection, on a consumer whose timer Celery emptied: the flush timer
        # must be armed anew, or only every flush_every-th message would flush (celery-batches 0.11; the
        # fix, clokep/celery-batches#108, is not released).
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        handler = super().Strategy(task, app, consumer)
        if broker.prefetch_is_static(app, consumer.connection):  # the consumer subscribes after this
            consumer.initial_prefetch_count = max(consumer.initial_prefetch_count, self.flush_every)

        def handle_with_room_to_fill(*args: Any, **kwargs: Any) -> Any:
            qos = consumer.qos  # 0 means unlimited
            if qos is not None and 0 < qos.value < self.flush_every:
                qos.increment_eventually(self.flush_every - qos.value)
            return handler(*args, **kwargs)

        return handle_with_room_to_fill

    def flush(self, requests: Any) -> Any:
        def on_return(succeeded: Any) -> None:
            for request in requests:
                if succeeded is True:
                    request.acknowledge()
                else:  # the events were neither applied nor re-queued: deliver them again
                    request.reject(requeue=True)

        def on_pool_process_lost(_error: Any) -> None:
            on_return(False)  # at once, rather than after the visibility timeout

        return self._pool.apply_async(
            _run_flush,
            (self, [SimpleRequest.from_request(r) for r in requests]),
            callback=on_return,
            error_callback=on_pool_process_lost,
        )


def _run_flush(task: CoalescingBatches, requests: list[SimpleRequest]) -> bool:
    try:
        task(requests)
    except Exception:
        log.exception("usage_flush_failed", task=task.name, events=len(requests))
        return False
    return True


def _event_of(request: SimpleRequest) -> Any:
    if request.kwargs and "event" in request.kwargs:
        return request.kwargs["event"]
    return request.args[0] if request.args else None


@app.task(
    name="metering.record_usage",
    base=CoalescingBatches,
    flush_every=settings().usage_flush_every,
    flush_interval=settings().usage_flush_interval,
    acks_late=True,
)
def record_usage(requests: list[SimpleRequest]) -> None:
    """One event per message; a flush applies all buffered events in one transaction."""
    events = [_event_of(request) for request in requests]
    try:
        in_place(lambda: apply_batch(events, "metering.record_usage"), FLUSH_ATTEMPTS, "metering.record_usage")
        return
    except Exception as exc:
        if not db.is_transient(exc):
            log.exception("usage_flush_failed", events=len(events))
            write_letters(_letters(events, failure_reason(exc, 0), "metering.record_usage"))
            return
    # Still failing: hand the events to the batch task, whose retries and dead letters take over.
    for start in range(0, len(events), MAX_BATCH_EVENTS):
        app.send_task("metering.record_usage_batch", args=[events[start : start + MAX_BATCH_EVENTS]])
