"""Stripe's webhook: a delivery verified (`verify`) and stored in the `stripe_events` inbox (`store`)
before the web process answers, then `stripe.process_event` queued for it (`enqueue`).

stripe.reconcile stores the events it finds in Stripe's event log through `check_event` and `store`
too, so an event reaches the handlers by one path however it arrived.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import stripe
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from worker.celery import app
from worker.dead_letters import storable
from worker.errors import Invalid
from worker.stripe.payloads import is_timestamp, to_datetime
from worker.tables import stripe_events

TASK_NAME = "stripe.process_event"
MAX_BODY_BYTES = 1024 * 1024
SIGNATURE_TOLERANCE = 300  # seconds, as Stripe's libraries
MAX_EVENT_ID_CHARS = 255


class InvalidWebhook(Invalid):
    """A delivery that is not a verified Stripe event; the reason is safe to answer with."""


def _signed_by(text: str, header: str, secret: str, tolerance: int | None) -> bool:
    try:
        return stripe.WebhookSignature.verify_header(text, header, secret, tolerance)
    except stripe.SignatureVerificationError:
        return False


def verify(body: bytes, signature_header: str | None, secrets: Sequence[str]) -> dict:
    """The event in a delivery whose Stripe-Signature matches one of `secrets` (any one: secrets rotate)
    and is at most SIGNATURE_TOLERANCE seconds old; else InvalidWebhook."""
    if not signature_header:
        raise InvalidWebhook("missing Stripe-Signature header")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidWebhook("body is not UTF-8") from None
    if not any(_signed_by(text, signature_header, secret, SIGNATURE_TOLERANCE) for secret in secrets):
        if any(_signed_by(text, signature_header, secret, None) for secret in secrets):
            raise InvalidWebhook(f"Stripe-Signature timestamp is more than {SIGNATURE_TOLERANCE} s old")
        raise InvalidWebhook("Stripe-Signature does not match the body with any configured signing secret")
    return parse_event(text)


def parse_event(text: str) -> dict:
    """A Stripe event from JSON text, checked for the fields the inbox and the handlers rely on."""
    try:
        event = json.loads(text)
    except ValueError:
        raise InvalidWebhook("body is not JSON") from None
    return check_event(event)


def check_event(event: Any) -> dict:
    """The event itself when it has the fields the inbox and the handlers rely on; else InvalidWebhook."""
    if not isinstance(event, dict) or event.get("object") != "event":
        raise InvalidWebhook('body is not a Stripe event (no "object": "event")')
    event_id, created, data = event.get("id"), event.get("created"), event.get("data")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID_CHARS:
        raise InvalidWebhook(f"Stripe event id must be a string of 1 to {MAX_EVENT_ID_CHARS} characters")
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise InvalidWebhook("Stripe event has no type")
    if not is_timestamp(created):
        raise InvalidWebhook("Stripe event created must be a Unix time in seconds")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise InvalidWebhook("Stripe event has no data.object")
    if storable(event) is not event:
        raise InvalidWebhook("Stripe event holds text PostgreSQL cannot store (a NUL character)")
    return event


def store(conn: Connection, event: dict, now: datetime) -> bool:
    """Put a verified event in the inbox; False when its id is already there (a duplicate delivery)."""
    inserted = conn.execute(
        pg_insert(stripe_events)
        .values(
            id=event["id"],
            type=event["type"],
            created=to_datetime(event["created"]),
            api_version=event.get("api_version") if isinstance(event.get("api_version"), str) else None,
            livemode=event.get("livemode") if isinstance(event.get("livemode"), bool) else None,
            payload=event,
            received_at=now,
        )
        .on_conflict_do_nothing(index_elements=[stripe_events.c.id])
        .returning(stripe_events.c.id)
    ).first()
    return inserted is not None


def enqueue(event_ids: Sequence[str]) -> None:
    """Queue stripe.process_event for each stored event."""
    for event_id in event_ids:
        app.send_task(TASK_NAME, args=[event_id])
