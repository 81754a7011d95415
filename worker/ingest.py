"""HTTP ingest: the events of a `POST /v1/usage-events` request, screened and queued for the worker.

The web runs the worker's own validation (`metering.parse_event`) and looks the request's users and
event ids up in one round trip each, so the caller learns at once which events are rejected and why.
Events that pass are queued, unchanged, to `metering.record_usage_batch`, the task Python producers
use; the worker validates again and remains the one place where usage is counted.

What the answer's words mean, truthfully, given that the web answers before the worker commits:
- `accepted`: queued for recording. The worker records each id once (a rare event that it then finds
  too late for its window is dead-lettered there, with its reason).
- `duplicates`: an id repeated within the request, or already in the ledger when the request arrived.
  Not queued again. An id that two requests race to send is queued twice and counted once.
- `rejected`: index, event id and reason of each event that cannot be applied as it is; each one is
  also stored in `dead_letters` (source `usage`), from where it can be replayed once its cause is fixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, metering, metrics
from worker.celery_app import app
from worker.dead_letters import Letter, record
from worker.logs import get_logger

log = get_logger(__name__)

MAX_BODY_BYTES = 1_114_112  # 1 MiB + 64 KiB: 1000 events of about 1 KiB each, and the envelope
BATCH_TASK = "metering.record_usage_batch"
ROUTE = "POST /v1/usage-events"  # recorded as the origin of the dead letters written here


class BadRequest(ValueError):
    """The body is not JSON or not one of the documented shapes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def events_of(body: bytes) -> list[Any]:
    """The events of a request body: one event object, or {"events": [...]} with 1 to 1000 items."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise BadRequest(f"body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise BadRequest(
            f'body must be a JSON object (one event, or {{"events": [...]}}), got {type(document).__name__}'
        )
    if "events" not in document:
        return [document]
    if len(document) > 1:
        others = ", ".join(sorted(str(key)[:64] for key in document if key != "events"))
        raise BadRequest(f'an {{"events": [...]}} body has no other keys; got {others}')
    events = document["events"]
    if not isinstance(events, list) or not 1 <= len(events) <= metering.MAX_BATCH_EVENTS:
        raise BadRequest(f"events must be a list of 1 to {metering.MAX_BATCH_EVENTS} usage events")
    return events


@dataclass
class Screening:
    queued: list[Any] = field(default_factory=list)  # the raw events to send to the worker
    duplicates: list[str] = field(default_factory=list)
    rejected: list[metering.Rejection] = field(default_factory=list)
    task_id: str | None = None

    @property
    def accepted(self) -> list[str]:
        return [event["event_id"] for event in self.queued]

    def as_dict(self) -> dict:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": [rejection.as_dict() for rejection in self.rejected],
            "task_id": self.task_id,
        }


def _recorded(conn: Connection, event_ids: list[str]) -> set[str]:
    """The ids among these that the ledger already holds."""
    rows = conn.execute(
        sa.text("SELECT event_id FROM usage_events WHERE event_id = ANY(CAST(:ids AS text[]))"), {"ids": event_ids}
    )
    return set(rows.scalars())


def screen(conn: Connection, raw_events: list[Any], now: datetime) -> Screening:
    """Sort a request's events into queued, duplicate and rejected (in request order), as the worker would."""
    screened = metering.screen(conn, raw_events, now)
    screening = Screening(duplicates=screened.duplicates, rejected=screened.rejected)
    recorded = _recorded(conn, [event.event_id for _, event in screened.events])
    for index, event in screened.events:
        if event.event_id in recorded:
            screening.duplicates.append(event.event_id)
        else:
            screening.queued.append(raw_events[index])
    return screening


def ingest(raw_events: list[Any], now: datetime) -> Screening:
    """Screen, queue the good events and dead-letter the rejected ones.

    The letters are written in the transaction that is still open when the task is sent: if the broker
    refuses the task, nothing is stored and the caller's retry starts clean; if the commit fails after the
    send, the retry queues the events again, which the ledger makes harmless.
    """
    with db.transaction() as conn:
        screening = screen(conn, raw_events, now)
        if screening.queued:
            screening.task_id = app.send_task(BATCH_TASK, args=[screening.queued]).id
        letters = [Letter("usage", raw_events[r.index], r.reason, r.event_id, ROUTE) for r in screening.rejected]
        record(conn, letters, now)
    metrics.usage_events("duplicate", len(screening.duplicates))
    metrics.usage_events("rejected", len(screening.rejected))
    log.info(
        "usage_queued",
        task_id=screening.task_id,
        event_ids=screening.accepted,
        duplicate_event_ids=screening.duplicates,
        rejected=len(screening.rejected),
    )
    return screening
