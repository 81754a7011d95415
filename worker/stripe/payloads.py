"""Reading Stripe objects: functions of a payload alone (and of STRIPE_PRICE_PLANS and PLAN_MINUTES).

Stripe renders every object in the API version it was asked for (a webhook endpoint's pinned version, or
the request's Stripe-Version), so the same subscription or invoice reaches the worker in several shapes:

- Period bounds: on the subscription (`current_period_start/end`) before 2025-03-31, on each of its
  items from 2025-03-31 (basil) on.
- An invoice's subscription: at `subscription` before basil, at `parent.subscription_details` from then on.
- An invoice line: `type` (`subscription` or `invoiceitem`) and `proration` before basil;
  `parent.type` (`subscription_item_details` or `invoice_item_details`) and `parent.<type>.proration`
  from then on.
- What an item costs: its `price` (the Prices API), or, for endpoints pinned to versions from before
  prices, only its `plan` (`amount`, `currency`, `interval`, `metadata`). Subscriptions from before items
  carry `plan` and `quantity` on themselves.

A payload that lacks what the worker needs is Rejected with a reason that names what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard

from worker.config import PLAN_TYPES, settings
from worker.dead_letters import Rejected

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
# Live statuses, by standing: of several live subscriptions of one user, the best standing is in force.
STANDING = {"active": 2, "trialing": 2, "past_due": 1, "unpaid": 1, "paused": 0}
ENDED = frozenset(status for status, mapped in STATUSES.items() if mapped == "canceled")
SUBSCRIPTION_EVENTS = tuple(
    f"customer.subscription.{change}" for change in ("created", "updated", "deleted", "paused", "resumed")
)
# Invoices of a subscription's own billing (its first invoice is `subscription_create`): a failed payment
# of one makes the subscription past due. Versions before billing_reason existed send none.
RENEWAL_BILLING = frozenset(
    {None, "subscription_cycle", "subscription_update", "subscription", "subscription_threshold"}
)
MONTHS_PER_INTERVAL = {"day": 12 / 365, "week": 12 / 52, "month": 1, "year": 12}


# -- fields -----------------------------------------------------------------------------------------------


def is_timestamp(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def to_datetime(value: int) -> datetime:
    """A Stripe timestamp (Unix seconds) as an aware UTC datetime."""
    return datetime.fromtimestamp(value, UTC)


def optional_datetime(obj: dict, key: str) -> datetime | None:
    value = obj.get(key)
    return to_datetime(value) if is_timestamp(value) else None


def stripe_id(obj: Any, key: str) -> str | None:
    """A Stripe id at `key`, whether the field holds the id or the expanded object."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def nested(obj: Any, *path: str) -> dict:
    """The object at `path`, or {} when any step is missing or not an object."""
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj if isinstance(obj, dict) else {}


def list_data(obj: Any, key: str) -> list[dict]:
    """The objects of a Stripe list at `key` ({"object": "list", "data": [...]})."""
    data = nested(obj, key).get("data")
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def _bounds(obj: dict, start_key: str, end_key: str) -> tuple[datetime, datetime] | None:
    start, end = obj.get(start_key), obj.get(end_key)
    if is_timestamp(start) and is_timestamp(end) and start < end:
        return to_datetime(start), to_datetime(end)
    return None


# -- subscriptions ----------------------------------------------------------------------------------------


def subscription_object(obj: Any, where: str) -> dict:
    """`obj` when it is a subscription with an id and a status, else Rejected naming `where`."""
    if not isinstance(obj, dict) or obj.get("object") != "subscription" or not stripe_id(obj, "id"):
        raise Rejected(f"{where} is not a subscription with an id")
    if not isinstance(obj.get("status"), str):
        raise Rejected(f"subscription {obj['id']} has no status")
    return obj


def first_item(subscription: dict) -> dict:
    """The subscription's first item; a subscription from before items (plan and quantity on itself) is its
    own item."""
    items = list_data(subscription, "items")
    if items:
        return items[0]
    if "items" not in subscription and subscription.get("plan"):
        return subscription
    raise Rejected(f"subscription {subscription['id']} has no items")


def subscription_period(subscription: dict) -> tuple[datetime, datetime]:
    """The current period: on the subscription (API before 2025-03-31) or on its first item (from then on)."""
    bounds = _bounds(subscription, "current_period_start", "current_period_end") or _bounds(
        first_item(subscription), "current_period_start", "current_period_end"
    )
    if bounds is None:
        raise Rejected(
            f"subscription {subscription['id']} has no current period (current_period_start/end on it or its items)"
        )
    return bounds


# -- plans ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    plan: str
    monthly_minutes: int
    price_id: str | None = None  # the price, or before prices the plan, that decided it
    price_cents: int | None = None
    currency: str | None = None
    monthly_amount_cents: int | None = None  # what the subscription costs a month (ranks subscriptions)


def free_plan() -> Plan:
    return Plan("free", settings().minutes_for_plan("free"))


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _monthly_amount(amount: int | None, quantity: int, interval: Any, interval_count: Any) -> int | None:
    months_each = MONTHS_PER_INTERVAL.get(interval) if isinstance(interval, str) else None
    count = _whole(interval_count) or 1
    if amount is None or months_each is None:
        return None
    return int(amount * quantity / (months_each * count))


def _plan_of(priced: dict, kind: str, amount: int | None, recurring: dict, quantity: int) -> Plan:
    """The plan of a price or of a legacy plan (`kind` names which): STRIPE_PRICE_PLANS, else its metadata
    `plan`; metadata `monthly_minutes` overrides the plan's PLAN_MINUTES."""
    priced_id = stripe_id(priced, "id")
    metadata = nested(priced, "metadata")
    plan = settings().stripe_price_plans.get(priced_id or "") or metadata.get("plan")
    if plan is None:
        raise Rejected(f"unknown Stripe {kind} {priced_id}: not in STRIPE_PRICE_PLANS and no metadata plan")
    if plan not in PLAN_TYPES:
        raise Rejected(f"Stripe {kind} {priced_id} names unknown plan {plan!r}; plans are {', '.join(PLAN_TYPES)}")
    minutes = metadata.get("monthly_minutes")
    if minutes is None:
        minutes = settings().minutes_for_plan(plan)
    elif isinstance(minutes, str) and minutes.isdigit():
        minutes = int(minutes)
    else:
        raise Rejected(f"Stripe {kind} {priced_id} has metadata monthly_minutes {minutes!r}, not a whole number")
    currency = priced.get("currency")
    return Plan(
        plan,
        minutes,
        priced_id,
        amount,
        currency.upper() if isinstance(currency, str) else None,
        _monthly_amount(amount, quantity, recurring.get("interval"), recurring.get("interval_count")),
    )


def item_plan(item: dict, subscription_id: str) -> Plan:
    """The plan of a subscription item: through its price, or, before prices, through its plan."""
    quantity = _whole(item.get("quantity"))
    quantity = 1 if quantity is None or quantity < 0 else quantity
    price, legacy = item.get("price"), item.get("plan")
    if price is not None:
        price = price if isinstance(price, dict) else {"id": price}  # an id alone when not expanded
        if stripe_id(price, "id") is not None:
            return _plan_of(price, "price", _whole(price.get("unit_amount")), nested(price, "recurring"), quantity)
    elif legacy is not None:
        legacy = legacy if isinstance(legacy, dict) else {"id": legacy}
        if stripe_id(legacy, "id") is not None:
            return _plan_of(legacy, "plan", _whole(legacy.get("amount")), legacy, quantity)
    raise Rejected(f"subscription {subscription_id} has no price on its first item")


@dataclass(frozen=True)
class SubscriptionState:
    """What a subscription payload says, as far as the worker cares."""

    id: str
    customer: str | None
    status: str  # Stripe's own
    plan: Plan | None  # None once the subscription has ended
    period: tuple[datetime, datetime] | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    trial_end: datetime | None
    created: datetime | None


def read_subscription(subscription: dict) -> SubscriptionState:
    """A validated subscription (`subscription_object`) read; a live one needs a plan and a period."""
    status, subscription_id = subscription["status"], subscription["id"]
    if status not in STATUSES:
        raise Rejected(f"subscription {subscription_id} has unknown status {status!r}")
    live = status in STANDING
    return SubscriptionState(
        id=subscription_id,
        customer=stripe_id(subscription, "customer"),
        status=status,
        plan=item_plan(first_item(subscription), subscription_id) if live else None,
        period=subscription_period(subscription) if live else None,
        cancel_at_period_end=subscription.get("cancel_at_period_end") is True,
        canceled_at=optional_datetime(subscription, "canceled_at"),
        trial_end=optional_datetime(subscription, "trial_end"),
        created=optional_datetime(subscription, "created"),
    )


# -- invoices ---------------------------------------------------------------------------------------------


def invoice_subscription(invoice: dict) -> str | None:
    """The invoice's subscription: at `subscription` (before 2025-03-31) or in `parent.subscription_details`."""
    return stripe_id(invoice, "subscription") or stripe_id(
        nested(invoice, "parent", "subscription_details"), "subscription"
    )


def billing_reason(invoice: dict) -> str | None:
    reason = invoice.get("billing_reason")
    return reason if isinstance(reason, str) else None


def is_proration(line: dict) -> bool:
    """A proration line: a credit or charge for part of a period, after a plan or quantity change."""
    parent = nested(line, "parent")
    return (
        line.get("proration") is True
        or nested(parent, "subscription_item_details").get("proration") is True
        or nested(parent, "invoice_item_details").get("proration") is True
    )


def bills_a_period(line: dict) -> bool:
    """A line that bills a subscription item for a whole period (not a proration, not an invoice item)."""
    is_subscription = (
        line.get("type") == "subscription" or nested(line, "parent").get("type") == "subscription_item_details"
    )
    return is_subscription and not is_proration(line)


def invoice_period(invoice: dict) -> tuple[datetime, datetime] | None:
    """The subscription period an invoice bills: the period of its first line that bills one. None when no
    line does (an upgrade or downgrade invoiced at once has proration lines only; a period does not move on
    them). An invoice's own period_start/end name the previous period for subscription invoices, so they
    are not used."""
    lines = list_data(invoice, "lines")
    if not lines:
        raise Rejected(f"invoice {stripe_id(invoice, 'id')} has no line with a period")
    for line in lines:
        bounds = _bounds(nested(line, "period"), "start", "end")
        if bounds is not None and bills_a_period(line):
            return bounds
    return None
