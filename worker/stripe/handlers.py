"""Applying Stripe events: each subscription's own state (`stripe_subscriptions`), and the user's one
`subscriptions` row derived from the subscription in force, written once per event.

Several subscriptions. A learner may hold several Stripe subscriptions (a second Checkout before the
first ends). Each event changes the state of its own subscription only; the user's row then shows the one
in force: the live one (active or trialing, before past_due or unpaid, before paused) that pays most a
month, then the one created last, then the greatest id. A subscription that ends while another is live
changes nothing the learner sees; when the last live one ends, the learner is back on the free plan. The
row's `stripe_subscription_id` names the deciding subscription, so every audit_logs row of a change says
which subscription decided it.

Order. Stripe delivers late, twice and out of order. A subscription's `state_at` holds `created` of the
event whose state was last applied to it (and `state_event_id` its id): an older event of that
subscription is recorded as `stale` and changes nothing. Stripe's timestamps are whole seconds, so for a
second event of the same second the subscription is fetched from Stripe's API (when STRIPE_API_KEY is set)
and what Stripe says now is applied; without a key the later-processed event wins. `invoice.paid` only
ever moves a period forward, which no older event can undo, so it does not claim the state time.

No network call under row locks. The fetch happens before any lock: an event that turns out to need one
raises FetchFirst under its locks, `applying` rolls back to before them, fetches, and applies the event
again, checking afresh under the locks whether it is still the same second (the state may have moved
meanwhile).

Periods. Billing periods move only on what moves them in Stripe: the subscription's own current period,
or an invoice line that bills a period (not a proration: an upgrade or downgrade invoiced at once moves
nothing). Periods only move forward: a Stripe period that starts before the user's current period is
clamped to it, the period that contains a new start is cut there, predicted periods inside the new one
go, and usage is recounted from the ledger, so usage follows the time it happened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeGuard, TypeVar
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Row

from worker import db, periods, usage_recount
from worker.config import settings
from worker.dead_letters import Rejected, replay
from worker.logs import get_logger
from worker.metering.limits import raise_alerts
from worker.stripe import api
from worker.stripe.payloads import (
    ENDED,
    RENEWAL_BILLING,
    STANDING,
    STATUSES,
    SUBSCRIPTION_EVENTS,
    Plan,
    SubscriptionState,
    billing_reason,
    free_plan,
    invoice_period,
    invoice_subscription,
    nested,
    read_subscription,
    stripe_id,
    subscription_object,
    to_datetime,
)
from worker.tables import profiles, stripe_subscriptions, subscriptions, usage_periods

log = get_logger(__name__)

T = TypeVar("T")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_FETCH_ROUNDS = 5  # answers fetched for one apply before it is given up as a transient failure


@dataclass(frozen=True)
class Cause:
    """What is being applied: it names every change in audit_logs and orders states."""

    event_id: str  # a Stripe event id, or 'reconcile:<run id>' for a repair
    created: datetime  # Stripe's time of the state it brings
    actor: str  # audit_logs.actor

    @classmethod
    def of_event(cls, event: dict) -> Cause:
        return cls(event["id"], to_datetime(event["created"]), f"stripe:{event['id']}")


@dataclass(frozen=True)
class Effect:
    outcome: str  # applied, ignored, stale
    user_id: str | None = None  # whose subscription changed (their cached quota is dropped after commit)
    note: str | None = None


def _ignored(note: str) -> Effect:
    return Effect("ignored", note=note)


def _name_actor(conn: Connection, cause: Cause) -> None:
    """audit_logs rows written by this transaction name the cause (schema.sql's audit trigger reads it)."""
    db.set_actor(conn, cause.actor)


# -- Stripe's current state, fetched before any lock --------------------------------------------------------


class FetchFirst(Exception):
    """Raised under row locks by an apply that needs what Stripe says now about a subscription."""

    def __init__(self, subscription_id: str) -> None:
        super().__init__(f"fetch subscription {subscription_id} from Stripe's API first")
        self.subscription_id = subscription_id


class Fetched:
    """Answers of Stripe's API, fetched with no row lock held, for the applies that follow."""

    def __init__(self, answers: dict[str, api.Answer] | None = None) -> None:
        self._answers: dict[str, api.Answer | Rejected] = dict(answers or {})

    def fetch(self, subscription_id: str) -> None:
        log.info("stripe_same_second_refetch", subscription=subscription_id)
        try:
            self._answers[subscription_id] = api.retrieve_subscription(subscription_id)
        except Rejected as refused:  # applied again, the event is dead-lettered with this reason
            self._answers[subscription_id] = refused

    def current(self, subscription_id: str) -> dict:
        answer = self._answers.get(subscription_id)
        if answer is None:
            raise FetchFirst(subscription_id)
        if isinstance(answer, Rejected):
            raise Rejected(answer.reason)
        return subscription_object(answer.payload, f"Stripe API answer for {subscription_id}")


_FETCHED: ContextVar[Fetched | None] = ContextVar("stripe_fetched", default=None)


def applying(conn: Connection, apply: Callable[[], T], fetched: Fetched | None = None) -> T:
    """Run `apply` in a savepoint; when it needs Stripe's current state of a subscription (FetchFirst),
    roll back to before every lock it took, fetch with none held, and run it again. Inside another
    `applying` (a checkout replaying dead letters under its locks), the outer one fetches, before its own
    locks. Rows other transactions changed meanwhile are read afresh by the next run."""
    if _FETCHED.get() is not None:
        return apply()
    fetched = fetched or Fetched()
    token = _FETCHED.set(fetched)
    try:
        for _ in range(MAX_FETCH_ROUNDS):
            try:
                with conn.begin_nested():
                    return apply()
            except FetchFirst as need:
                fetched.fetch(need.subscription_id)
    finally:
        _FETCHED.reset(token)
    raise db.StaleRead(f"Stripe states kept moving over {MAX_FETCH_ROUNDS} fetches")


def _same_second_state(cause: Cause, subscription_id: str) -> dict | None:
    """Two events of one second cannot be ordered: what Stripe says now, or None (the later one wins)."""
    if not settings().stripe_api_key:
        log.warning("stripe_same_second_last_writer_wins", event_id=cause.event_id, subscription=subscription_id)
        return None
    fetched = _FETCHED.get()
    if fetched is None:
        raise FetchFirst(subscription_id)
    return fetched.current(subscription_id)


# -- finding and locking the user --------------------------------------------------------------------------

_USERS_OF_SUBSCRIPTION = sa.text(
    """
    SELECT user_id::text FROM stripe_subscriptions WHERE id = :id
    UNION SELECT user_id::text FROM subscriptions WHERE stripe_subscription_id = :id
    """
)
_USERS_OF_CUSTOMER = sa.text(
    """
    SELECT user_id::text FROM subscriptions WHERE stripe_customer_id = :customer
    UNION SELECT user_id::text FROM stripe_subscriptions WHERE customer_id = :customer
    """
)


def _known_profile(conn: Connection, value: Any) -> str | None:
    try:
        user_id = str(UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None
    if user_id is None:
        return None
    return conn.scalar(sa.select(profiles.c.id.cast(sa.Text)).where(profiles.c.id == user_id))


def users_of_subscription(conn: Connection, subscription_id: str | None) -> list[str]:
    if subscription_id is None:
        return []
    return sorted(conn.scalars(_USERS_OF_SUBSCRIPTION, {"id": subscription_id}))


def user_for_subscription(conn: Connection, subscription: dict) -> str:
    """The user of a subscription: linked by its id, else by its customer, else its metadata `user_id`."""
    subscription_id, customer = subscription["id"], stripe_id(subscription, "customer")
    users = users_of_subscription(conn, subscription_id)
    if not users and customer is not None:
        users = sorted(conn.scalars(_USERS_OF_CUSTOMER, {"customer": customer}))
        if len(users) > 1:
            raise Rejected(f"Stripe customer {customer} is linked to {len(users)} users")
    if users:
        return users[0]
    user_id = _known_profile(conn, nested(subscription, "metadata").get("user_id"))
    if user_id is None:
        raise Rejected(
            f"no user for Stripe customer {customer} (subscription {subscription_id}); link it by checkout "
            "client_reference_id or metadata user_id"
        )
    return user_id


def _lock_user(conn: Connection, user_id: str, now: datetime) -> Row:
    """The user's subscription row (created on the free plan when missing), locked after the user's usage
    periods: the lock order of every writer is usage_periods before subscriptions. Every writer of the
    user's stripe_subscriptions rows holds this lock."""
    periods.ensure_periods(conn, {user_id: periods.Span(now, now)}, now)
    conn.execute(
        sa.select(usage_periods.c.id)
        .where(usage_periods.c.user_id == user_id)
        .order_by(usage_periods.c.period_start)
        .with_for_update()
    ).all()
    return conn.execute(sa.select(subscriptions).where(subscriptions.c.user_id == user_id).with_for_update()).one()


# -- each subscription's own state -------------------------------------------------------------------------


def _states_of(conn: Connection, user_id: str) -> dict[str, Row]:
    rows = conn.execute(sa.select(stripe_subscriptions).where(stripe_subscriptions.c.user_id == user_id))
    return {row.id: row for row in rows}


def _is_older(known: Row | None, cause: Cause) -> TypeGuard[Row]:
    return known is not None and known.state_at is not None and cause.created < known.state_at


def _is_same_second(known: Row | None, cause: Cause) -> bool:
    return known is not None and cause.created == known.state_at and cause.event_id != known.state_event_id


def _stale(known: Row) -> Effect:
    return Effect("stale", note=f"state of {known.state_event_id} is newer")


def _upsert_state(conn: Connection, subscription_id: str, values: dict[str, Any]) -> Row:
    statement = pg_insert(stripe_subscriptions).values(id=subscription_id, **values)
    changed = {key: value for key, value in values.items() if key != "linked_at"}
    return conn.execute(
        statement.on_conflict_do_update(index_elements=[stripe_subscriptions.c.id], set_=changed).returning(
            stripe_subscriptions
        )
    ).one()


def _update_state(conn: Connection, subscription_id: str, **values: Any) -> Row:
    return conn.execute(
        sa.update(stripe_subscriptions)
        .where(stripe_subscriptions.c.id == subscription_id)
        .values(values)
        .returning(stripe_subscriptions)
    ).one()


def _record_state(
    conn: Connection, user_id: str, state: SubscriptionState, cause: Cause, known: Row | None, now: datetime
) -> Row:
    """Store what the subscription is now; an ended one keeps the plan and period it last had, and a period
    never moves back (an invoice of a newer period may have come before this event)."""
    values: dict[str, Any] = {
        "user_id": user_id,
        "customer_id": state.customer or (known.customer_id if known is not None else None),
        "status": state.status,
        "cancel_at_period_end": state.cancel_at_period_end,
        "canceled_at": state.canceled_at,
        "trial_end": state.trial_end,
        "created": state.created or (known.created if known is not None else None) or cause.created,
        "state_at": cause.created,
        "state_event_id": cause.event_id,
        "linked_at": now,
        "updated_at": now,
    }
    if state.plan is not None and state.period is not None:
        values.update(
            plan_type=state.plan.plan,
            monthly_minutes_limit=state.plan.monthly_minutes,
            price_id=state.plan.price_id,
            price_cents=state.plan.price_cents,
            currency=state.plan.currency,
            monthly_amount_cents=state.plan.monthly_amount_cents,
        )
        stored = known.current_period_start if known is not None else None
        if stored is None or state.period[0] >= stored:
            values.update(current_period_start=state.period[0], current_period_end=state.period[1])
    return _upsert_state(conn, state.id, values)


def in_force(states: Iterable[Row]) -> Row | None:
    """The subscription the user's row follows, among live ones: best standing, then most paid a month,
    then created last, then the greatest id (so the choice never depends on the order events came in)."""
    live = [state for state in states if state.status in STANDING]
    return max(
        live,
        key=lambda state: (STANDING[state.status], state.monthly_amount_cents or 0, state.created or EPOCH, state.id),
        default=None,
    )


# -- the user's row: derived from the subscription in force, written once -------------------------------------


@dataclass(frozen=True)
class Target:
    """What the user's row should say: the deciding subscription's state, with its plan and period."""

    decider: Row
    plan: Plan
    period: tuple[datetime, datetime] | None  # None: the current period stays


_CALENDAR_MONTH = sa.text(
    """
    SELECT calendar_month_start(:now, worker_timezone(timezone)) AS period_start,
           next_period_end(:now, worker_timezone(timezone), true) AS period_end
    FROM profiles WHERE id = :user_id
    """
)


def _target(conn: Connection, row: Row, states: dict[str, Row], subject: str, now: datetime) -> Target | None:
    """The subscription in force decides; when none is live, the one that ended (the user's, else this
    event's) puts the learner on the free plan, for the calendar month from now on."""
    winner = in_force(states.values())
    if winner is not None:
        plan = Plan(
            winner.plan_type,
            winner.monthly_minutes_limit,
            winner.price_id,
            winner.price_cents,
            winner.currency,
            winner.monthly_amount_cents,
        )
        return Target(winner, plan, (winner.current_period_start, winner.current_period_end))
    ended = states.get(row.stripe_subscription_id)
    decider = ended if ended is not None and ended.status is not None else states.get(subject)
    if decider is None or decider.status is None:
        return None
    if row.plan_type == "free":
        return Target(decider, free_plan(), None)
    month = conn.execute(_CALENDAR_MONTH, {"now": now, "user_id": row.user_id}).one()
    return Target(decider, free_plan(), (month.period_start, month.period_end))


def _clamped(row: Row, period: tuple[datetime, datetime] | None, now: datetime) -> tuple[datetime, datetime]:
    """Periods only move forward: the floor is the current period's start, or its end once it is over."""
    if period is None:
        return row.current_period_start, row.current_period_end
    start, end = period
    floor = row.current_period_end if row.current_period_end <= now else row.current_period_start
    if end <= floor:  # Stripe's period is already behind us: only the plan changes
        return row.current_period_start, row.current_period_end
    return max(start, floor), end


# The period that contains a new period's start ends there, and predicted periods that start inside
# the new one go (usage rows do not point at periods: the recount puts their usage where it belongs), so
# periods never overlap.
_CUT_PERIOD = sa.text(
    """
    UPDATE usage_periods SET period_end = :start
    WHERE user_id = :user_id AND period_start < :start AND period_end > :start
    """
)
_DROP_OVERLAPPED_PERIODS = sa.text(
    """
    DELETE FROM usage_periods
    WHERE user_id = :user_id AND archived_at IS NULL AND period_start > :start AND period_start < :end
    RETURNING period_end
    """
)


class _PeriodUse(NamedTuple):
    user_id: str
    period_start: datetime
    used_before: int
    used_ms: int
    limit_ms: int


def _move_usage_periods(
    conn: Connection, row: Row, start: datetime, end: datetime, plan: Plan, now: datetime
) -> usage_recount.PeriodTotal:
    """The user's usage periods moved to a current period [start, end) on `plan` (the subscription row is
    the caller's to write): usage recounted from the ledger, alerts raised when a lower limit puts usage
    past a threshold that no new usage crossed. Returns the new current period."""
    user_id = str(row.user_id)
    conn.execute(_CUT_PERIOD, {"user_id": row.user_id, "start": start})
    dropped_ends = conn.execute(_DROP_OVERLAPPED_PERIODS, {"user_id": row.user_id, "start": start, "end": end})
    last = max([end, *dropped_ends.scalars()])
    moved = periods.PeriodStart(user_id, start, end, plan.plan, plan.monthly_minutes)
    periods.start_periods(conn, [moved], now, authoritative=True)
    predicted = periods.PeriodPlan(plan.plan, plan.monthly_minutes, calendar=plan.plan == "free")
    periods.ensure_periods(conn, {user_id: periods.Span(start, last)}, now, {user_id: predicted})  # no usage left out
    totals = usage_recount.recount_periods(
        conn, min(start, row.current_period_start), max(last, row.current_period_end), [user_id]
    )
    current = next(total for total in totals if total.period_start == start)
    raise_alerts(conn, [_PeriodUse(user_id, start, 0, current.used_ms, current.limit_ms)], now)
    return current


def _reset_date(user_id: Any, end: datetime) -> Any:
    """The user's local date of the period's end, computed where the time zone is known."""
    local_end = sa.func.timezone(sa.func.worker_timezone(profiles.c.timezone), sa.cast(end, sa.DateTime(timezone=True)))
    return sa.select(sa.cast(local_end, sa.Date)).where(profiles.c.id == user_id).scalar_subquery()


def _write_user(conn: Connection, row: Row, target: Target, now: datetime) -> bool:
    """Make the user's row what `target` says, in one statement; False when it already does."""
    decider, plan = target.decider, target.plan
    start, end = _clamped(row, target.period, now)
    values: dict[str, Any] = {
        "plan_type": plan.plan,
        "monthly_minutes_limit": plan.monthly_minutes,
        "current_period_start": start,
        "current_period_end": end,
        "status": STATUSES[decider.status],
        "stripe_status": decider.status,
        "stripe_subscription_id": decider.id,
        "stripe_customer_id": decider.customer_id or row.stripe_customer_id,
        "stripe_price_id": plan.price_id,
        "monthly_price_cents": plan.price_cents,
        "currency": plan.currency or row.currency,
        "cancel_at_period_end": decider.cancel_at_period_end,
        "canceled_at": decider.canceled_at,
        "trial_end": decider.trial_end,
        "stripe_state_at": decider.state_at,
        "stripe_state_event_id": decider.state_event_id,
    }
    current = (row.current_period_start, row.current_period_end, row.plan_type, row.monthly_minutes_limit)
    moves = (start, end, plan.plan, plan.monthly_minutes) != current
    if moves:
        period = _move_usage_periods(conn, row, start, end, plan, now)
        kept = row.limit_reached_at if row.current_period_start == start else None
        values["monthly_minutes_used"] = period.used_ms // 60_000
        values["limit_reached_at"] = (kept or now) if period.used_ms >= period.limit_ms else None
    changes = {key: value for key, value in values.items() if getattr(row, key) != value}
    if not changes:
        return False
    if moves:
        changes["reset_date"] = _reset_date(row.user_id, end)
    conn.execute(sa.update(subscriptions).where(subscriptions.c.user_id == row.user_id).values(changes))
    return True


def _decide(conn: Connection, row: Row, states: dict[str, Row], subject: str, now: datetime) -> Effect:
    """The user's row follows the subscription in force, now that `subject`'s state changed."""
    target = _target(conn, row, states, subject, now)
    if target is None or not _write_user(conn, row, target, now):
        return _ignored(f"subscription {subject} recorded; the user's row stays as {row.stripe_subscription_id} set it")
    return Effect("applied", str(row.user_id), note=f"decided by subscription {target.decider.id}")


# -- the handlers ------------------------------------------------------------------------------------------


def _apply_state(conn: Connection, cause: Cause, row: Row, subscription: dict, now: datetime) -> Effect:
    """Record a subscription's state (unless an event of it is newer) and derive the user's row."""
    states = _states_of(conn, str(row.user_id))
    known = states.get(subscription["id"])
    if _is_older(known, cause):
        return _stale(known)
    if _is_same_second(known, cause):
        subscription = _same_second_state(cause, subscription["id"]) or subscription
    if subscription["status"] == "incomplete":
        return _ignored(f"subscription {subscription['id']} is incomplete: nothing changes until its payment settles")
    state = read_subscription(subscription)
    states[state.id] = _record_state(conn, str(row.user_id), state, cause, known, now)
    return _decide(conn, row, states, state.id, now)


def on_subscription_event(conn: Connection, cause: Cause, obj: dict, now: datetime) -> Effect:
    subscription = subscription_object(obj, "data.object")
    if subscription["status"] == "incomplete":
        return _ignored(f"subscription {subscription['id']} is incomplete: nothing changes until its payment settles")
    row = _lock_user(conn, user_for_subscription(conn, subscription), now)
    return _apply_state(conn, cause, row, subscription, now)


def _invoice_user(conn: Connection, invoice: dict) -> tuple[str, str] | Effect:
    """The invoice's subscription and its user, or the effect of an invoice that is none of ours."""
    subscription_id = invoice_subscription(invoice)
    if subscription_id is None:
        return _ignored("not a subscription invoice")
    users = users_of_subscription(conn, subscription_id)
    if not users:  # its subscription never became one of ours (e.g. still incomplete)
        return _ignored(f"subscription {subscription_id} is not linked to a user")
    return subscription_id, users[0]


def _invoice_state(
    conn: Connection, cause: Cause, subscription_id: str, user_id: str, now: datetime
) -> tuple[Row, dict[str, Row], Row] | Effect:
    """The user's locked row, their subscriptions' states and the invoice's subscription's, or the effect
    of an invoice that changes nothing."""
    row = _lock_user(conn, user_id, now)
    states = _states_of(conn, user_id)
    known = states.get(subscription_id)
    if known is None or known.status is None:
        return _ignored(f"subscription {subscription_id} has no state yet: its own events bring it")
    if _is_older(known, cause):
        return _stale(known)
    return row, states, known


def on_invoice_paid(conn: Connection, cause: Cause, invoice: dict, now: datetime) -> Effect:
    """A paid invoice that bills a new period of its subscription starts that period (on its plan)."""
    linked = _invoice_user(conn, invoice)
    if isinstance(linked, Effect):
        return linked
    period = invoice_period(invoice)
    if period is None:
        return _ignored(
            f"invoice {stripe_id(invoice, 'id')} ({billing_reason(invoice)}) bills no period: proration lines "
            "move nothing"
        )
    found = _invoice_state(conn, cause, *linked, now)
    if isinstance(found, Effect):
        return found
    row, states, known = found
    if known.status in ENDED:
        return _ignored(f"subscription {known.id} has ended")
    if period[0] <= known.current_period_start:
        return _ignored("the invoice starts no new period")
    states[known.id] = _update_state(
        conn, known.id, current_period_start=period[0], current_period_end=period[1], updated_at=now
    )
    return _decide(conn, row, states, known.id, now)


def on_invoice_payment_failed(conn: Connection, cause: Cause, invoice: dict, now: datetime) -> Effect:
    """A failed payment of a subscription's own invoice makes that subscription past due."""
    linked = _invoice_user(conn, invoice)
    if isinstance(linked, Effect):
        return linked
    found = _invoice_state(conn, cause, *linked, now)
    if isinstance(found, Effect):
        return found
    row, states, known = found
    if _is_same_second(known, cause):
        current = _same_second_state(cause, known.id)
        if current is not None:
            return _apply_state(conn, cause, row, current, now)
    reason = billing_reason(invoice)
    if reason not in RENEWAL_BILLING:
        return _ignored(f"a payment of a {reason} invoice failed: the subscription's status is Stripe's to change")
    if known.status in ENDED:
        return _ignored(f"subscription {known.id} has ended")
    status = known.status if known.status in ("past_due", "unpaid") else "past_due"
    states[known.id] = _update_state(
        conn, known.id, status=status, state_at=cause.created, state_event_id=cause.event_id, updated_at=now
    )
    return _decide(conn, row, states, known.id, now)


def on_checkout_completed(conn: Connection, cause: Cause, session: dict, now: datetime) -> Effect:
    """Tie the session's customer (and subscription) to the user named by client_reference_id or metadata."""
    session_id = stripe_id(session, "id")
    named = session.get("client_reference_id") or nested(session, "metadata").get("user_id")
    user_id = _known_profile(conn, named)
    if user_id is None:
        raise Rejected(f"checkout session {session_id} names no known user (client_reference_id or metadata user_id)")
    customer, subscription_id = stripe_id(session, "customer"), stripe_id(session, "subscription")
    if customer is None and subscription_id is None:
        return _ignored(f"checkout session {session_id} has no customer to link")
    holders = set(users_of_subscription(conn, subscription_id)) - {user_id}
    if holders:
        raise Rejected(f"subscription {subscription_id} is already linked to user {holders.pop()}")
    row = _lock_user(conn, user_id, now)
    if subscription_id is not None:  # its state comes with its own events
        link = {"user_id": user_id, "customer_id": customer, "linked_at": now, "updated_at": now}
        conn.execute(pg_insert(stripe_subscriptions).values(id=subscription_id, **link).on_conflict_do_nothing())
    # A live subscription of the user stays shown; its own events say when it changes.
    if subscription_id is None or (row.stripe_subscription_id is not None and row.plan_type != "free"):
        subscription_id = row.stripe_subscription_id
    linked = {"stripe_customer_id": customer or row.stripe_customer_id, "stripe_subscription_id": subscription_id}
    if (row.stripe_customer_id, row.stripe_subscription_id) != tuple(linked.values()):
        conn.execute(sa.update(subscriptions).where(subscriptions.c.user_id == row.user_id).values(linked))
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
    """Apply one stored event in the caller's transaction (inside `applying`); Rejected when it cannot be
    applied as it is."""
    handler = HANDLERS.get(event["type"])
    if handler is None:
        return _ignored(f"{event['type']} is not handled")
    cause = Cause.of_event(event)
    _name_actor(conn, cause)  # before any change: even a subscription row created for the user names the event
    return handler(conn, cause, event["data"]["object"], now)


def apply_current_state(conn: Connection, cause: Cause, subscription: dict, now: datetime) -> Effect:
    """Make a subscription what Stripe's API says it is now (a repair of stripe.reconcile, inside
    `applying`), through the same path as its events."""
    _name_actor(conn, cause)
    return on_subscription_event(conn, cause, subscription, now)
