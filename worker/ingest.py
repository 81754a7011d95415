"""HTTP ingest: the events of a `POST /v1/usage-events` request, applied before the answer.

A 202 means durable: the web applies the request's events in one metering transaction (the worker's own
`metering.pipeline.apply_batch`, so validation, exactly-once and every total are the same) and answers
once it has committed. Nothing of an accepted event waits in a broker that could lose it.

What the answer's words mean:
- `accepted`: committed to the ledger by this request, with every total that follows from it;
- `duplicates`: an id repeated within the request, or already in the ledger (counted once, before);
- `rejected`: index, event id and reason of each event that cannot be applied as it is; each one is also
  stored in `dead_letters` (source `usage`), from where it can be replayed once its cause is fixed.

A transaction that fails transiently (a lock timeout behind a stalled writer, a deadlock, a restart) is
retried in place a few times; after that the caller gets a 503 and retries the whole request safely.
"""

from __future__ import annotations

import json
from typing import Any

from worker.errors import Invalid
from worker.metering.events import MAX_BATCH_EVENTS
from worker.metering.pipeline import Outcome, apply_batch
from worker.retry import in_place

MAX_BODY_BYTES = 1_114_112  # 1 MiB + 64 KiB: 1000 events of about 1 KiB each, and the envelope
ROUTE = "POST /v1/usage-events"  # recorded as the origin of the dead letters written here
ATTEMPTS = 3  # in-place tries of a request's transaction


class BadRequest(Invalid):
    """The body is not JSON or not one of the documented shapes."""


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
        others = ", ".join(sorted(repr(key)[:66] for key in document if key != "events"))
        raise BadRequest(f'an {{"events": [...]}} body has no other keys; got {others}')
    events = document["events"]
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH_EVENTS:
        raise BadRequest(f"events must be a list of 1 to {MAX_BATCH_EVENTS} usage events")
    return events


def ingest(raw_events: list[Any]) -> Outcome:
    """Apply a request's events (committed before this returns), retrying transient failures in place."""
    return in_place(lambda: apply_batch(raw_events, ROUTE), ATTEMPTS, ROUTE)
