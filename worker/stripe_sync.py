"""Stripe: signed webhooks into the `stripe_events` inbox, and each event applied to `subscriptions`.

The web process verifies a delivery and stores it (`verify`, `store`) before answering, then queues
`stripe.process_event`, which applies the event (`process`) and marks its inbox row processed in one
transaction. `sweep` re-queues rows whose message was lost and gives up on rows that keep failing, so an
event Stripe delivered is applied, or lands in `dead_letters` with a reason, whatever happens to Redis.

Order. Stripe delivers late, twice and out of order. `subscriptions.stripe_state_at` holds `created` of the
event whose state was last applied (and `stripe_state_event_id` its id): an older event is recorded as
`stale` and changes nothing. Stripe's timestamps are whole seconds, so for a second event of the same
second the subscription is fetched from Stripe's API (when STRIPE_API_KEY is set) and what Stripe says now
is applied; without a key the later-processed event wins. `invoice.paid` only ever moves the period forward,
which no older event can undo, so it does not claim the state time: a subscription event of an earlier
second that arrives after it still carries the plan and status.

Payload shapes. API versions before 2025-03-31 put the period bounds on the subscription
(`current_period_start/end`) and an invoice's subscription at `subscription`; from 2025-03-31 on they are
on the subscription's items and at `parent.subscription_details.subscription`. Both are read.

Periods only move forward: a Stripe period that starts before the user's current period is clamped to it,
and the period that contains a new start is cut there, so usage periods never overlap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import sqlalchemy as sa
import stripe
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Row

from worker import db, metrics, periods, quota, rebuild
from worker.celery import app
from worker.config import PLAN_TYPES, settings
from worker.dead_letters import MAX_REASON_CHARS, Letter, Rejected, replay, replayer, storable, write
from worker.errors import Invalid
from worker.logs import get_logger
from worker.metering.limits import raise_alerts
from worker.tables import profiles, stripe_events, subscriptions, usage_periods

log = get_logger(__name__)

TASK_NAME = "stripe.process_event"
MAX_BODY_BYTES = 1024 * 1024
SIGNATURE_TOLERANCE = 300  # seconds, as Stripe's libraries
MAX_EVENT_ID_CHARS = 255

# Stripe's subscription status -> the seed's four. `incomplete` (first payment not settled) is absent on
# purpose: it changes nothing until Stripe says how the payment ended.
STATUSES = {
    "active": "active",
    "trialing": "active",
    "past_due": "past_due",
    "unpaid": "past_due",
    "paused": "paused",
    "canceled": "canceled",
    "incomplete_expired": "canceled",
}
SUBSCRIPTION_EVENTS = tuple(
    f"customer.subscription.{change}" for change in ("created", "updated", "deleted", "paused", "resumed")
)

REQUEUE_AFTER = timedelta(minutes=5)  # an inbox row this old and not tried this long has lost its message
MAX_ATTEMPTS = 5  # failed tries before the sweep dead-letters an inbox row
SWEEP_BATCH = 1000


# -- the webhook: verify and store ---------------------------------------------------------------------


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
    if not isinstance(event, dict) or event.get("object") != "event":
        raise InvalidWebhook('body is not a Stripe event (no "object": "event")')
    event_id, created, data = event.get("id"), event.get("created"), event.get("data")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID_CHARS:
        raise InvalidWebhook(f"Stripe event id must be a string of 1 to {MAX_EVENT_ID_CHARS} characters")
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise InvalidWebhook("Stripe event has no type")
    if not _is_timestamp(created):
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
            created=_datetime(event["created"]),
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


# -- reading payloads ----------------------------------------------------------------------------------


def _is_timestamp(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _datetime(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _optional_datetime(obj: dict, key: str) -> datetime | None:
    value = obj.get(key)
    return _datetime(value) if _is_timestamp(value) else None


def _id(obj: dict, key: str) -> str | None:
    """A Stripe id at `key`, whether the field holds the id or the expanded object."""
    value = obj.get(key)
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _dict(obj: Any, *path: str) -> dict:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj if isinstance(obj, dict) else {}


def _list_data(obj: dict, key: str) -> list[dict]:
    data = _dict(obj, key).get("data")
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def _subscription(obj: Any, where: str) -> dict:
    if obj.get("object") != "subscription" or not _id(obj, "id"):
        raise Rejected(f"{where} is not a subscription with an id")
    if not isinstance(obj.get("status"), str):
        raise Rejected(f"subscription {obj['id']} has no status")
    return obj


def _first_item(subscription: dict) -> dict:
    items = _list_data(subscription, "items")
    if not items:
        raise Rejected(f"subscription {subscription['id']} has no items")
    return items[0]


def _bounds(obj: dict, start_key: str, end_key: str) -> tuple[datetime, datetime] | None:
    start, end = obj.get(start_key), obj.get(end_key)
    if _is_timestamp(start) and _is_timestamp(end) and start < end:
        return _datetime(start), _datetime(end)
    return None


def subscription_period(subscription: dict) -> tuple[datetime, datetime]:
    """The current period: on the subscription (API before 2025-03-31) or on its first item (from then on)."""
    bounds = _bounds(subscription, "current_period_start", "current_period_end") or _bounds(
        _first_item(subscription), "current_period_start", "current_period_end"
    )
    if bounds is None:
        raise Rejected(
            f"subscription {subscription['id']} has no current period (current_period_start/end on it or its items)"
        )
    return bounds


def invoice_subscription(invoice: dict) -> str | None:
    """The invoice's subscription: at `subscription` (before 2025-03-31) or in `parent.subscription_details`."""
    return _id(invoice, "subscription") or _id(_dict(invoice, "parent", "subscription_details"), "subscription")


def _is_proration(line: dict) -> bool:
    return line.get("proration") is True or _dict(line, "parent", "subscription_item_details").get("proration") is True


def invoice_period(invoice: dict) -> tuple[datetime, datetime]:
    """The subscription period an invoice bills: its first line that is not a proration (an invoice's own
    period_start/end name the previous period for subscription invoices, so they are not used)."""
    lines = _list_data(invoice, "lines")
    for line in sorted(lines, key=_is_proration):
        bounds = _bounds(_dict(line, "period"), "start", "end")
        if bounds is not None:
            return bounds
    raise Rejected(f"invoice {_id(invoice, 'id')} has no line with a period")


@dataclass(frozen=True)
class Plan:
    plan: str
    monthly_minutes: int
    price_id: str | None = None
    price_cents: int | None = None
    currency: str | None = None


def plan_for_price(price: Any, subscription_id: str) -> Plan:
    """The plan of a price: STRIPE_PRICE_PLANS, else the price's metadata `plan`; metadata
    `monthly_minutes` overrides the plan's PLAN_MINUTES."""
    price = price if isinstance(price, dict) else {"id": price}  # an id alone when the price is not expanded
    price_id = _id(price, "id")
    if price_id is None:
        raise Rejected(f"subscription {subscription_id} has no price on its first item")
    metadata = _dict(price, "metadata")
    plan = settings().stripe_price_plans.get(price_id) or metadata.get("plan")
    if plan is None:
        raise Rejected(f"unknown Stripe price {price_id}: not in STRIPE_PRICE_PLANS and no metadata plan")
    if plan not in PLAN_TYPES:
        raise Rejected(f"Stripe price {price_id} names unknown plan {plan!r}; plans are {', '.join(PLAN_TYPES)}")
    minutes = metadata.get("monthly_minutes")
    if minutes is None:
        minutes = settings().minutes_for_plan(plan)
    elif isinstance(minutes, str) and minutes.isdigit():
        minutes = int(minutes)
    else:
        raise Rejected(f"Stripe price {price_id} has metadata monthly_minutes {minutes!r}, not a whole number")
    amount, currency = price.get("unit_amount"), price.get("currency")
    return Plan(
        plan,
        minutes,
        price_id,
        amount if isinstance(amount, int) and not isinstance(amount, bool) else None,
        currency.upper() if isinstance(currency, str) else None,
    )


def free_plan() -> Plan:
    return Plan("free", settings().minutes_for_plan("free"))


# -- finding and locking the user's subscription row ---------------------------------------------------


def _known_profile(conn: Connection, value: Any) -> str | None:
    try:
        user_id = str(UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None
    if user_id is None:
        return None
    return conn.scalar(sa.select(profiles.c.id.cast(sa.Text)).where(profiles.c.id == user_id))


def _linked_users(conn: Connection, column: sa.Column, value: str | None) -> list[str]:
    if value is None:
        return []
    return list(conn.scalars(sa.select(subscriptions.c.user_id.cast(sa.Text)).where(column == value)))


def user_for_subscription(conn: Connection, subscription: dict) -> str:
    """The user of a subscription: linked by its id, else by its customer, else its metadata `user_id`."""
    subscription_id, customer = subscription["id"], _id(subscription, "customer")
    users = _linked_users(conn, subscriptions.c.stripe_subscription_id, subscription_id)
    if not users:
        users = _linked_users(conn, subscriptions.c.stripe_customer_id, customer)
        if len(users) > 1:
            raise Rejected(f"Stripe customer {customer} is linked to {len(users)} users")
    if users:
        return users[0]
    user_id = _known_profile(conn, _dict(subscription, "metadata").get("user_id"))
    if user_id is None:
        raise Rejected(
            f"no user for Stripe customer {customer} (subscription {subscription_id}); link it by checkout "
            "client_reference_id or metadata user_id"
        )
    return user_id


def _lock(conn: Connection, user_id: str, now: datetime) -> Row:
    """The user's subscription row (created on the free plan when missing), locked after the user's usage
    periods: the lock order of every writer is usage_periods before subscriptions."""
    periods.ensure_periods(conn, {user_id: periods.Span(now, now)}, now)
    conn.execute(
        sa.select(usage_periods.c.id)
        .where(usage_periods.c.user_id == user_id)
        .order_by(usage_periods.c.period_start)
        .with_for_update()
    ).all()
    return conn.execute(sa.select(subscriptions).where(subscriptions.c.user_id == user_id).with_for_update()).one()


# -- applying events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cause:
    """The event being applied: it names every change in audit_logs and orders states."""

    event_id: str
    created: datetime


@dataclass(frozen=True)
class Effect:
    outcome: str  # applied, ignored, stale
    user_id: str | None = None  # whose subscription changed (their cached quota is dropped after commit)
    note: str | None = None


def _ignored(note: str) -> Effect:
    return Effect("ignored", note=note)


def _name_actor(conn: Connection, cause: Cause) -> None:
    """audit_logs rows written by this transaction name the event (schema.sql's audit trigger reads it)."""
    db.set_actor(conn, f"stripe:{cause.event_id}")


def _is_older(row: Row, cause: Cause) -> bool:
    return row.stripe_state_at is not None and cause.created < row.stripe_state_at


def _is_same_second(row: Row, cause: Cause) -> bool:
    return cause.created == row.stripe_state_at and cause.event_id != row.stripe_state_event_id


_CALENDAR_MONTH = sa.text(
    """
    SELECT calendar_month_start(:now, worker_timezone(timezone)) AS period_start,
           next_period_end(:now, worker_timezone(timezone), true) AS period_end
    FROM profiles WHERE id = :user_id
    """
)

# The period that contains a new period's start ends there, and predicted periods that start inside
# the new one go (usage rows do not point at periods: the recount puts their usage where it belongs), so
# periods never overlap.
_CUT_PERIOD = sa.text(
    """
    UPDATE usage_periods SET period_end = :start
    WHERE user_id = :user_id AND period_start < :start AND period_end > :start
    """
)
_CURRENT_PERIOD_USAGE = sa.text(
    """
    SELECT u.user_id, u.period_start, 0 AS used_before, u.used_ms, u.limit_ms
    FROM usage_periods u JOIN subscriptions s ON s.user_id = u.user_id AND s.current_period_start = u.period_start
    WHERE u.user_id = :user_id
    """
)
_DROP_OVERLAPPED_PERIODS = sa.text(
    """
    DELETE FROM usage_periods
    WHERE user_id = :user_id AND archived_at IS NULL AND period_start > :start AND period_start < :end
    RETURNING period_end
    """
)


def _move_period(conn: Connection, row: Row, start: datetime, end: datetime, plan: Plan, now: datetime) -> None:
    """Point the subscription at [start, end) with `plan`, through the monthly reset's own code. Periods only
    move forward: the floor is the current period's start, or its end once it is over."""
    floor = row.current_period_end if row.current_period_end <= now else row.current_period_start
    if end <= floor:  # Stripe's period is already behind us: only the plan changes
        start, end = row.current_period_start, row.current_period_end
    else:
        start = max(start, floor)
    current = (row.current_period_start, row.current_period_end, row.plan_type, row.monthly_minutes_limit)
    if (start, end, plan.plan, plan.monthly_minutes) == current:
        return
    user_id = str(row.user_id)
    conn.execute(_CUT_PERIOD, {"user_id": row.user_id, "start": start})
    dropped_ends = conn.execute(_DROP_OVERLAPPED_PERIODS, {"user_id": row.user_id, "start": start, "end": end})
    last = max([end, *dropped_ends.scalars()])
    periods.move_to_periods(conn, [periods.PeriodStart(user_id, start, end, plan.plan, plan.monthly_minutes)], now,
                            authoritative=True)  # fmt: skip
    periods.ensure_periods(conn, {user_id: periods.Span(start, last)}, now)  # no usage left without a period
    rebuild.recount_periods(
        conn, [user_id], min(start, row.current_period_start), max(last, row.current_period_end), now
    )
    # A lower limit can put usage past a threshold that no new usage crossed.
    raise_alerts(conn, conn.execute(_CURRENT_PERIOD_USAGE, {"user_id": row.user_id}).all(), now)


def _apply_subscription_state(conn: Connection, cause: Cause, row: Row, subscription: dict, now: datetime) -> Effect:
    """Make the user's row what the subscription says (the caller has checked the event is not older)."""
    status, subscription_id = subscription["status"], subscription["id"]
    if status == "incomplete":
        return _ignored(f"subscription {subscription_id} is incomplete: nothing changes until its payment settles")
    if status not in STATUSES:
        raise Rejected(f"subscription {subscription_id} has unknown status {status!r}")
    mapped = STATUSES[status]
    if mapped == "canceled":
        if row.stripe_subscription_id not in (None, subscription_id):
            return _ignored(f"subscription {subscription_id} ended, but the user's is {row.stripe_subscription_id}")
        plan = free_plan()
        start, end = conn.execute(_CALENDAR_MONTH, {"now": now, "user_id": row.user_id}).one()
    else:
        plan = plan_for_price(_first_item(subscription).get("price"), subscription_id)
        start, end = subscription_period(subscription)
    _move_period(conn, row, start, end, plan, now)
    conn.execute(
        sa.update(subscriptions)
        .where(subscriptions.c.user_id == row.user_id)
        .values(
            status=mapped,
            stripe_status=status,
            stripe_subscription_id=subscription_id,
            stripe_customer_id=_id(subscription, "customer") or row.stripe_customer_id,
            stripe_price_id=plan.price_id,
            monthly_price_cents=plan.price_cents,
            currency=plan.currency or row.currency,
            cancel_at_period_end=subscription.get("cancel_at_period_end") is True,
            canceled_at=_optional_datetime(subscription, "canceled_at"),
            trial_end=_optional_datetime(subscription, "trial_end"),
            stripe_state_at=cause.created,
            stripe_state_event_id=cause.event_id,
        )
    )
    return Effect("applied", str(row.user_id))


def fetch_subscription(subscription_id: str) -> dict:
    """The subscription as Stripe has it now. An unreachable or failing Stripe is a ConnectionError (the
    task retries it); a refusal (bad key, unknown id) is Rejected."""
    config = settings()
    client = stripe.StripeClient(
        config.stripe_api_key, base_addresses={"api": config.stripe_api_base}, max_network_retries=2
    )
    try:
        subscription = client.v1.subscriptions.retrieve(subscription_id)
    except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
        raise ConnectionError(f"Stripe API unavailable fetching subscription {subscription_id}: {exc}") from exc
    except stripe.StripeError as exc:
        raise Rejected(f"Stripe API refused subscription {subscription_id} (HTTP {exc.http_status}): {exc}") from exc
    return _subscription(subscription.to_dict(), f"Stripe API answer for {subscription_id}")


def _same_second_state(cause: Cause, subscription_id: str) -> dict | None:
    """Two events of one second cannot be ordered: what Stripe says now, or None (the later one wins)."""
    if settings().stripe_api_key:
        log.info("stripe_same_second_refetch", event_id=cause.event_id, subscription=subscription_id)
        return fetch_subscription(subscription_id)
    log.warning("stripe_same_second_last_writer_wins", event_id=cause.event_id, subscription=subscription_id)
    return None


def on_subscription_event(conn: Connection, cause: Cause, obj: dict, now: datetime) -> Effect:
    subscription = _subscription(obj, "data.object")
    if subscription["status"] == "incomplete":
        return _ignored(f"subscription {subscription['id']} is incomplete: nothing changes until its payment settles")
    row = _lock(conn, user_for_subscription(conn, subscription), now)
    if _is_older(row, cause):
        return Effect("stale", note=f"state of {row.stripe_state_event_id} is newer")
    if _is_same_second(row, cause):
        subscription = _same_second_state(cause, subscription["id"]) or subscription
    return _apply_subscription_state(conn, cause, row, subscription, now)


def _invoice_row(conn: Connection, invoice: dict, now: datetime) -> tuple[str, Row] | Effect:
    """The invoice's subscription id and the locked row of its user, or why the invoice changes nothing."""
    subscription_id = invoice_subscription(invoice)
    if subscription_id is None:
        return _ignored("not a subscription invoice")
    users = _linked_users(conn, subscriptions.c.stripe_subscription_id, subscription_id)
    if not users:  # its subscription never became one of ours (e.g. still incomplete)
        return _ignored(f"subscription {subscription_id} is not linked to a user")
    return subscription_id, _lock(conn, users[0], now)


def on_invoice_paid(conn: Connection, cause: Cause, invoice: dict, now: datetime) -> Effect:
    """A paid invoice for a new period starts that period (on the current plan)."""
    found = _invoice_row(conn, invoice, now)
    if isinstance(found, Effect):
        return found
    _, row = found
    start, end = invoice_period(invoice)
    if _is_older(row, cause):
        return Effect("stale", note=f"state of {row.stripe_state_event_id} is newer")
    if row.plan_type == "free" or start <= row.current_period_start:
        return _ignored("the invoice starts no new period")
    plan = Plan(row.plan_type, row.monthly_minutes_limit)
    _move_period(conn, row, start, end, plan, now)
    return Effect("applied", str(row.user_id))


def on_invoice_payment_failed(conn: Connection, cause: Cause, invoice: dict, now: datetime) -> Effect:
    found = _invoice_row(conn, invoice, now)
    if isinstance(found, Effect):
        return found
    subscription_id, row = found
    if _is_older(row, cause):
        return Effect("stale", note=f"state of {row.stripe_state_event_id} is newer")
    if _is_same_second(row, cause):
        subscription = _same_second_state(cause, subscription_id)
        if subscription is not None:
            return _apply_subscription_state(conn, cause, row, subscription, now)
    if row.plan_type == "free":
        return _ignored(f"subscription {subscription_id} has ended")
    conn.execute(
        sa.update(subscriptions)
        .where(subscriptions.c.user_id == row.user_id)
        .values(status="past_due", stripe_state_at=cause.created, stripe_state_event_id=cause.event_id)
    )
    return Effect("applied", str(row.user_id))


def on_checkout_completed(conn: Connection, cause: Cause, session: dict, now: datetime) -> Effect:
    """Tie the session's customer (and subscription) to the user named by client_reference_id or metadata."""
    session_id = _id(session, "id")
    named = session.get("client_reference_id") or _dict(session, "metadata").get("user_id")
    user_id = _known_profile(conn, named)
    if user_id is None:
        raise Rejected(f"checkout session {session_id} names no known user (client_reference_id or metadata user_id)")
    customer, subscription_id = _id(session, "customer"), _id(session, "subscription")
    if customer is None and subscription_id is None:
        return _ignored(f"checkout session {session_id} has no customer to link")
    holders = set(_linked_users(conn, subscriptions.c.stripe_subscription_id, subscription_id)) - {user_id}
    if holders:
        raise Rejected(f"subscription {subscription_id} is already linked to user {holders.pop()}")
    row = _lock(conn, user_id, now)
    # A live subscription of the user stays linked; its own events say when it changes.
    if subscription_id is None or (row.stripe_subscription_id is not None and row.plan_type != "free"):
        subscription_id = row.stripe_subscription_id
    conn.execute(
        sa.update(subscriptions)
        .where(subscriptions.c.user_id == row.user_id)
        .values(stripe_customer_id=customer or row.stripe_customer_id, stripe_subscription_id=subscription_id)
    )
    _replay_letters_of_customer(conn, customer, now)
    return Effect("applied", user_id)


# Stripe sends customer.subscription.created and invoice.paid of a Checkout about when it sends
# checkout.session.completed, often first: those were dead-lettered for want of a user, and the link
# that checkout makes is their fix.
_LETTERS_OF_CUSTOMER = sa.text(
    """
    SELECT d.id FROM dead_letters d JOIN stripe_events e ON e.id = d.ref
    WHERE d.source = 'stripe' AND d.replayed_at IS NULL AND e.payload -> 'data' -> 'object' ->> 'customer' = :customer
    ORDER BY e.created, d.id
    """
)


def _replay_letters_of_customer(conn: Connection, customer: str | None, now: datetime) -> None:
    if customer is None:
        return
    for letter_id in conn.execute(_LETTERS_OF_CUSTOMER, {"customer": customer}).scalars():
        try:
            replay(conn, letter_id, now)
        except LookupError:  # being replayed by someone else right now
            continue


HANDLERS = {
    "checkout.session.completed": on_checkout_completed,
    **dict.fromkeys(SUBSCRIPTION_EVENTS, on_subscription_event),
    "invoice.paid": on_invoice_paid,
    "invoice.payment_failed": on_invoice_payment_failed,
}


def apply_event(conn: Connection, event: dict, now: datetime) -> Effect:
    """Apply one stored event in the caller's transaction; Rejected when it cannot be applied as it is."""
    handler = HANDLERS.get(event["type"])
    if handler is None:
        return _ignored(f"{event['type']} is not handled")
    cause = Cause(event["id"], _datetime(event["created"]))
    _name_actor(conn, cause)  # before any change: even a subscription row created for the user names the event
    return handler(conn, cause, event["data"]["object"], now)


# -- processing inbox rows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Processed:
    event_id: str
    outcome: str
    user_id: str | None = None
    already: bool = False  # processed before: this delivery changed nothing


def _invalidate_after_commit(conn: Connection, user_id: str | None) -> None:
    """The user's cached quota answers go once the change commits (their plan or period moved)."""
    if user_id is not None:
        db.after_commit(conn, lambda: quota.invalidate([user_id]))


def _lock_inbox_row(conn: Connection, event_id: str) -> Row | None:
    return conn.execute(sa.select(stripe_events).where(stripe_events.c.id == event_id).with_for_update()).first()


def _mark_processed(conn: Connection, event_id: str, outcome: str, error: str | None, now: datetime) -> None:
    conn.execute(
        sa.update(stripe_events)
        .where(stripe_events.c.id == event_id)
        .values(
            processed_at=now,
            outcome=outcome,
            attempts=stripe_events.c.attempts + 1,
            last_error=error,
            last_attempt_at=now,
        )
    )


def process(conn: Connection, event_id: str, now: datetime) -> Processed:
    """Apply a stored event and mark it processed, in the caller's transaction. The inbox row is locked, so
    two deliveries of one message never both apply it; an event that cannot be applied is dead-lettered.
    Once it commits, the user's cached quota goes and the event is counted."""
    row = _lock_inbox_row(conn, event_id)
    if row is None:
        raise Rejected(f"Stripe event {event_id} is not in stripe_events")
    if row.processed_at is not None:
        return Processed(event_id, row.outcome, already=True)
    error = None
    try:
        with conn.begin_nested():
            effect = apply_event(conn, row.payload, now)
    except Rejected as exc:
        write(conn, [Letter("stripe", row.payload, exc.reason, event_id, TASK_NAME)], now)
        effect, error = Effect("dead_lettered"), exc.reason
    _mark_processed(conn, event_id, effect.outcome, error, now)
    db.after_commit(conn, lambda: metrics.stripe_event(row.type, effect.outcome))
    _invalidate_after_commit(conn, effect.user_id)
    log.info("stripe_event_processed", event_id=event_id, type=row.type, outcome=effect.outcome, note=effect.note)
    return Processed(event_id, effect.outcome, effect.user_id)


def record_failure(conn: Connection, event_id: str, error: str, now: datetime) -> None:
    """Count a try that failed (its transaction rolled back) so the sweep can give up on the event."""
    conn.execute(
        sa.update(stripe_events)
        .where(stripe_events.c.id == event_id, stripe_events.c.processed_at.is_(None))
        .values(attempts=stripe_events.c.attempts + 1, last_error=error[:MAX_REASON_CHARS], last_attempt_at=now)
    )


@replayer("stripe")
def replay_event(conn: Connection, payload: Any, now: datetime) -> None:
    """Apply a dead-lettered event again from its inbox row (after the customer was linked, the price
    configured...); an event applied meanwhile is left as it is."""
    event_id = payload.get("id") if isinstance(payload, dict) else None
    row = _lock_inbox_row(conn, event_id) if isinstance(event_id, str) else None
    if row is None:
        raise Rejected(f"Stripe event {event_id!r} is not in stripe_events")
    if row.outcome in ("applied", "ignored", "stale"):
        return
    effect = apply_event(conn, row.payload, now)
    _mark_processed(conn, event_id, effect.outcome, None, now)
    _invalidate_after_commit(conn, effect.user_id)


# -- the sweep -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    requeue: list[str]  # sent to stripe.process_event once the sweep's transaction has committed
    dead_lettered: list[str]


# Rows whose failure already has a pending dead letter (the task wrote it): closed, not tried again; the
# letter's replay applies them.
_CLOSE_LETTERED = sa.text(
    """
    UPDATE stripe_events SET processed_at = :now, outcome = 'dead_lettered'
    WHERE id IN (
        SELECT e.id FROM stripe_events e
        WHERE e.processed_at IS NULL AND e.received_at <= :cutoff
          AND (e.last_attempt_at IS NULL OR e.last_attempt_at <= :cutoff)
          AND EXISTS (SELECT 1 FROM dead_letters d
                      WHERE d.source = 'stripe' AND d.ref = e.id AND d.replayed_at IS NULL)
        ORDER BY e.id LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)

_EXHAUSTED = sa.text(
    """
    SELECT id, payload, attempts, last_error FROM stripe_events
    WHERE processed_at IS NULL AND attempts >= :max_attempts
      AND (last_attempt_at IS NULL OR last_attempt_at <= :cutoff)
    ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED
    """
)

# last_attempt_at is also set when a row is re-queued, so it is re-queued once per REQUEUE_AFTER, not at
# every sweep while its message waits behind others.
_REQUEUE = sa.text(
    """
    UPDATE stripe_events SET last_attempt_at = :now
    WHERE id IN (
        SELECT id FROM stripe_events
        WHERE processed_at IS NULL AND received_at <= :cutoff
          AND (last_attempt_at IS NULL OR last_attempt_at <= :cutoff)
        ORDER BY received_at LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)


def sweep(conn: Connection, now: datetime) -> SweepResult:
    """Find inbox rows left unprocessed REQUEUE_AFTER after receipt and not tried since: re-queue them, or,
    after MAX_ATTEMPTS failed tries, dead-letter them with their last error. Rows locked by a run in
    progress are skipped, so two sweeps at once never handle one row twice."""
    params = {"now": now, "cutoff": now - REQUEUE_AFTER, "batch": SWEEP_BATCH}
    closed = list(conn.scalars(_CLOSE_LETTERED, params))
    exhausted = conn.execute(_EXHAUSTED, {**params, "max_attempts": MAX_ATTEMPTS}).all()
    write(
        conn,
        [
            Letter(
                "stripe",
                row.payload,
                f"gave up after {row.attempts} attempts: {row.last_error or 'no error recorded'}",
                row.id,
                TASK_NAME,
            )
            for row in exhausted
        ],
        now,
    )
    given_up = [row.id for row in exhausted]
    if given_up:
        conn.execute(
            sa.update(stripe_events)
            .where(stripe_events.c.id.in_(given_up))
            .values(processed_at=now, outcome="dead_lettered")
        )
    requeue = list(conn.scalars(_REQUEUE, params))
    if requeue:
        db.after_commit(conn, lambda: enqueue(requeue))
    if requeue or closed or given_up:
        log.info("stripe_sweep", requeued=len(requeue), dead_lettered=len(closed) + len(given_up))
    return SweepResult(requeue=requeue, dead_lettered=closed + given_up)
