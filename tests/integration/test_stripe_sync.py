"""Stripe events applied to subscriptions, against the real database (rolled back after each test).

Payloads are built as Stripe sends them (tests/support/stripe.py), in both API shapes: before 2025-03-31
(period bounds on the subscription, an invoice's subscription at `subscription`) and from then on (bounds
on the items, the subscription at `parent.subscription_details`).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from support.factories import insert_user
from support.run import environment
from support.stripe import (
    NOW,
    PERIOD_END,
    PERIOD_START,
    SHAPES,
    FakeStripe,
    audit_actors,
    checkout_session,
    deliver,
    invoice,
    linked_user,
    metered,
    new_id,
    open_periods,
    period_usage,
    price,
    row,
    stripe_event,
    stripe_stand_in,
    subscribed_user,
    subscription,
    ts,
)

from worker import dead_letters
from worker.dead_letters import Rejected
from worker.stripe import inbox as stripe_inbox
from worker.stripe import payloads, webhook

MARCH = (datetime(2027, 3, 1, tzinfo=UTC), datetime(2027, 4, 1, tzinfo=UTC))  # a UTC user's calendar month


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with stripe_stand_in() as fake:
        yield fake


# -- helpers -----------------------------------------------------------------------------------------------


def inbox(connection: sa.Connection, event_id: str) -> sa.Row:
    return connection.execute(sa.text("SELECT * FROM stripe_events WHERE id = :id"), {"id": event_id}).one()


def letters(connection: sa.Connection, event_id: str) -> list[sa.Row]:
    query = "SELECT * FROM dead_letters WHERE source = 'stripe' AND ref = :id ORDER BY id"
    return connection.execute(sa.text(query), {"id": event_id}).all()


def all_periods(connection: sa.Connection, user: uuid.UUID) -> list[tuple]:
    query = "SELECT period_start, period_end, plan_type, archived_at IS NOT NULL FROM usage_periods WHERE user_id = :u"
    return [tuple(r) for r in connection.execute(sa.text(query + " ORDER BY period_start"), {"u": user})]


# -- linking -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["reference", "metadata"])
def test_checkout_ties_customer_and_subscription_to_the_user(connection, via) -> None:
    user = insert_user(connection)
    session = checkout_session("cus_link", "sub_link", user, via=via)
    event = stripe_event("checkout.session.completed", session, ts(NOW))
    processed = deliver(connection, event)
    assert (processed.outcome, processed.user_id) == ("applied", str(user))
    subscription_row = row(connection, user)
    assert (subscription_row.stripe_customer_id, subscription_row.stripe_subscription_id) == ("cus_link", "sub_link")
    assert subscription_row.plan_type == "free"  # the plan comes with the subscription's own events
    assert set(audit_actors(connection, user)) == {f"stripe:{event['id']}"}


@pytest.mark.parametrize("named", [None, "not-a-uuid", str(uuid.UUID(int=7))])
def test_checkout_naming_no_known_user_is_dead_lettered(connection, named) -> None:
    event = stripe_event("checkout.session.completed", checkout_session("cus_x", "sub_x", named), ts(NOW))
    assert deliver(connection, event).outcome == "dead_lettered"
    (letter,) = letters(connection, event["id"])
    assert "names no known user" in letter.reason
    assert letter.payload == event


def test_checkout_does_not_take_a_subscription_linked_to_another_user(connection) -> None:
    first, second = insert_user(connection), insert_user(connection)
    deliver(connection, stripe_event("checkout.session.completed", checkout_session("cus_a", "sub_a", first), 1))
    event = stripe_event("checkout.session.completed", checkout_session("cus_b", "sub_a", second), 2)
    assert deliver(connection, event).outcome == "dead_lettered"
    assert f"already linked to user {first}" in letters(connection, event["id"])[0].reason


# -- subscription events, both shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("api_version", SHAPES)
@pytest.mark.parametrize(
    ("type_", "status", "expected_status"),
    [
        ("customer.subscription.created", "active", "active"),
        ("customer.subscription.updated", "trialing", "active"),
        ("customer.subscription.paused", "paused", "paused"),
        ("customer.subscription.resumed", "active", "active"),
    ],
)
def test_subscription_events_set_plan_status_and_period(connection, api_version, type_, status, expected_status):
    customer, subscription_id = new_id("cus"), new_id("sub")
    user = linked_user(connection, customer)
    payload = subscription(subscription_id, customer, api_version, status=status, trial_end=ts(PERIOD_END))
    event = stripe_event(type_, payload, ts(NOW) - 60, api_version)
    processed = deliver(connection, event)
    assert (processed.outcome, processed.user_id) == ("applied", str(user))

    subscription_row = row(connection, user)
    assert (subscription_row.status, subscription_row.stripe_status) == (expected_status, status)
    assert (subscription_row.plan_type, subscription_row.monthly_minutes_limit) == ("standard", 900)
    assert (subscription_row.current_period_start, subscription_row.current_period_end) == (PERIOD_START, PERIOD_END)
    assert subscription_row.reset_date == PERIOD_END.date()
    assert subscription_row.stripe_subscription_id == subscription_id
    assert (subscription_row.stripe_price_id, subscription_row.monthly_price_cents) == ("price_standard", 1500)
    assert subscription_row.currency == "USD"
    assert subscription_row.trial_end == PERIOD_END
    assert subscription_row.stripe_state_at == datetime.fromtimestamp(event["created"], UTC)
    assert subscription_row.stripe_state_event_id == event["id"]
    # The free calendar period ends where Stripe's starts; Stripe's is the one open period, with its limit.
    assert all_periods(connection, user) == [
        (MARCH[0], PERIOD_START, "free", True),
        (PERIOD_START, PERIOD_END, "standard", False),
    ]
    assert open_periods(connection, user)[0].limit_ms == 900 * 60_000
    inbox_row = inbox(connection, event["id"])
    assert (inbox_row.outcome, inbox_row.attempts, inbox_row.last_error) == ("applied", 1, None)
    assert inbox_row.processed_at == NOW
    assert f"stripe:{event['id']}" in audit_actors(connection, user)


@pytest.mark.parametrize("api_version", SHAPES)
def test_deleted_subscription_puts_the_user_back_on_the_free_calendar_month(connection, api_version) -> None:
    user, customer, subscription_id = subscribed_user(connection, api_version, timezone="Asia/Tokyo")
    ended = subscription(subscription_id, customer, api_version, status="canceled", canceled_at=ts(NOW))
    # Stripe sends the deletion when the period is over (cancel at period end): the free month follows it.
    after_end = PERIOD_END + timedelta(seconds=3)
    event = stripe_event("customer.subscription.deleted", ended, ts(PERIOD_END), api_version)
    assert deliver(connection, event, after_end).outcome == "applied"

    subscription_row = row(connection, user)
    assert (subscription_row.plan_type, subscription_row.monthly_minutes_limit) == ("free", 60)
    assert (subscription_row.status, subscription_row.stripe_status) == ("canceled", "canceled")
    assert subscription_row.canceled_at == NOW
    # Tokyo's May 1st, 00:00 (UTC+9), ends the free period that starts where the paid one ended.
    tokyo_may = datetime(2027, 4, 30, 15, tzinfo=UTC)
    assert (subscription_row.current_period_start, subscription_row.current_period_end) == (PERIOD_END, tokyo_may)
    assert [(p.period_start, p.plan_type, p.limit_ms) for p in open_periods(connection, user)] == [
        (PERIOD_END, "free", 60 * 60_000)
    ]


def test_deleted_mid_period_keeps_the_usage_of_the_period_on_the_free_plan(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    ended = subscription(subscription_id, customer, status="canceled")
    assert deliver(connection, stripe_event("customer.subscription.deleted", ended, ts(NOW))).outcome == "applied"
    subscription_row = row(connection, user)
    # The period runs from the paid period's start to the calendar month's end, no period overlapping another.
    assert (subscription_row.current_period_start, subscription_row.current_period_end) == (PERIOD_START, MARCH[1])
    assert all_periods(connection, user) == [
        (MARCH[0], PERIOD_START, "free", True),
        (PERIOD_START, MARCH[1], "free", False),
    ]


def test_a_deleted_subscription_that_is_not_the_users_current_one_changes_nothing(connection) -> None:
    user, customer, _ = subscribed_user(connection)
    other = subscription(new_id("sub"), customer, status="canceled")
    processed = deliver(connection, stripe_event("customer.subscription.deleted", other, ts(NOW)))
    assert processed.outcome == "ignored"
    assert row(connection, user).plan_type == "standard"


@pytest.mark.parametrize(
    ("status", "expected"),
    [(status, mapped) for status, mapped in payloads.STATUSES.items()] + [("incomplete", None)],
)
def test_every_stripe_status_maps_to_the_seeds_four(connection, status, expected) -> None:
    customer = new_id("cus")
    user = linked_user(connection, customer)
    event = stripe_event("customer.subscription.updated", subscription(new_id("sub"), customer, status=status), 5)
    processed = deliver(connection, event)
    subscription_row = row(connection, user)
    if expected is None:  # incomplete: recorded, nothing changes yet
        assert processed.outcome == "ignored"
        assert (subscription_row.status, subscription_row.stripe_status, subscription_row.plan_type) == (
            "active",
            None,
            "free",
        )
        return
    assert processed.outcome == "applied"
    assert (subscription_row.status, subscription_row.stripe_status) == (expected, status)
    assert subscription_row.plan_type == ("free" if expected == "canceled" else "standard")


def test_a_subscription_finds_its_user_through_metadata_and_links_the_customer(connection) -> None:
    user = insert_user(connection)
    payload = subscription("sub_meta", "cus_meta", user_id=user)
    assert deliver(connection, stripe_event("customer.subscription.created", payload, 5)).outcome == "applied"
    assert (row(connection, user).stripe_customer_id, row(connection, user).stripe_subscription_id) == (
        "cus_meta",
        "sub_meta",
    )


def test_a_new_live_subscription_of_the_customer_replaces_the_old_one(connection) -> None:
    user, customer, old_id = subscribed_user(connection)
    replacement = subscription(new_id("sub"), customer, price_object=price("price_premium"), created=ts(NOW))
    assert deliver(connection, stripe_event("customer.subscription.created", replacement, ts(NOW))).outcome == "applied"
    assert (row(connection, user).stripe_subscription_id, row(connection, user).plan_type) == (
        replacement["id"],
        "premium",
    )
    # The old subscription ending later does not end the new one.
    ended = subscription(old_id, customer, status="canceled")
    assert deliver(connection, stripe_event("customer.subscription.deleted", ended, ts(NOW) + 5)).outcome == "ignored"
    assert row(connection, user).plan_type == "premium"


def test_a_period_already_behind_the_current_one_changes_only_the_plan(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    earlier = subscription(subscription_id, customer, price_object=price("price_premium"),
                           start=PERIOD_START - timedelta(days=31), end=PERIOD_START)  # fmt: skip
    assert deliver(connection, stripe_event("customer.subscription.updated", earlier, ts(NOW))).outcome == "applied"
    subscription_row = row(connection, user)
    assert (subscription_row.current_period_start, subscription_row.current_period_end) == (PERIOD_START, PERIOD_END)
    assert [(p.period_start, p.plan_type) for p in open_periods(connection, user)] == [(PERIOD_START, "premium")]


# -- plans from prices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price_object", "plan", "minutes"),
    [
        (price("price_premium"), "premium", 3000),
        (price("price_standard", monthly_minutes="1200"), "standard", 1200),
        (price("price_custom", plan="enterprise"), "enterprise", 10000),
        (price("price_custom", plan="premium", monthly_minutes="4500"), "premium", 4500),
    ],
)
def test_the_plan_comes_from_the_price(connection, price_object, plan, minutes) -> None:
    customer = new_id("cus")
    user = linked_user(connection, customer)
    payload = subscription(new_id("sub"), customer, price_object=price_object)
    deliver(connection, stripe_event("customer.subscription.created", payload, 5))
    assert (row(connection, user).plan_type, row(connection, user).monthly_minutes_limit) == (plan, minutes)
    assert open_periods(connection, user)[-1].limit_ms == minutes * 60_000


def test_a_plan_change_within_the_period_changes_the_open_periods_limit(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    upgraded = subscription(subscription_id, customer, price_object=price("price_premium"))
    assert deliver(connection, stripe_event("customer.subscription.updated", upgraded, ts(NOW))).outcome == "applied"
    (period,) = open_periods(connection, user)
    assert (period.period_start, period.plan_type, period.limit_ms) == (PERIOD_START, "premium", 3000 * 60_000)
    assert (row(connection, user).plan_type, row(connection, user).monthly_minutes_limit) == ("premium", 3000)


def test_an_unknown_price_is_dead_lettered_and_replays_once_configured(connection) -> None:
    customer = new_id("cus")
    user = linked_user(connection, customer)
    payload = subscription(new_id("sub"), customer, price_object=price("price_mystery"))
    event = stripe_event("customer.subscription.created", payload, 5)
    assert deliver(connection, event).outcome == "dead_lettered"
    (letter,) = letters(connection, event["id"])
    assert "unknown Stripe price price_mystery" in letter.reason
    assert inbox(connection, event["id"]).last_error == letter.reason
    assert row(connection, user).plan_type == "free"

    assert dead_letters.replay(connection, letter.id, NOW) == letter.reason  # still unknown: stays
    with environment(STRIPE_PRICE_PLANS="price_mystery=premium"):
        assert dead_letters.replay(connection, letter.id, NOW) is None
    assert row(connection, user).plan_type == "premium"
    assert inbox(connection, event["id"]).outcome == "applied"
    assert letters(connection, event["id"])[0].replayed_at == NOW


def test_an_unknown_customer_is_dead_lettered_and_replays_once_linked(connection) -> None:
    user = insert_user(connection)
    event = stripe_event("customer.subscription.created", subscription("sub_orphan", "cus_orphan"), 5)
    assert deliver(connection, event).outcome == "dead_lettered"
    (letter,) = letters(connection, event["id"])
    assert letter.reason.startswith("no user for Stripe customer cus_orphan")

    assert dead_letters.replay(connection, letter.id, NOW).startswith("no user for Stripe customer cus_orphan")
    connection.execute(  # an operator ties the customer to the user by hand
        sa.text(
            "INSERT INTO subscriptions (user_id, stripe_customer_id, current_period_start, current_period_end,"
            " reset_date) VALUES (:u, 'cus_orphan', :start, :end, :end)"
        ),
        {"u": user, "start": MARCH[0], "end": MARCH[1]},
    )
    assert dead_letters.replay(connection, letter.id, NOW) is None
    assert (row(connection, user).plan_type, row(connection, user).stripe_subscription_id) == ("standard", "sub_orphan")
    # Replaying again (or a second letter of one event) applies nothing twice.
    stripe_inbox.replay_event(connection, {"id": event["id"]}, NOW)
    assert (row(connection, user).plan_type, row(connection, user).stripe_subscription_id) == ("standard", "sub_orphan")
    assert audit_actors(connection, user).count(f"stripe:{event['id']}") == 1  # period, plan and state: one write


# -- invoices ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api_version", SHAPES)
@pytest.mark.parametrize("proration_first", [False, True])
def test_a_paid_invoice_for_a_new_period_starts_it(connection, api_version, proration_first) -> None:
    user, customer, subscription_id = subscribed_user(connection, api_version)
    next_end = datetime(2027, 5, 5, 8, tzinfo=UTC)
    paid = invoice(subscription_id, customer, api_version, PERIOD_END, next_end, proration_first)
    event = stripe_event("invoice.paid", paid, ts(PERIOD_END) + 3600, api_version)
    processed = deliver(connection, event, PERIOD_END + timedelta(hours=1))
    assert processed.outcome == "applied"
    subscription_row = row(connection, user)
    assert (subscription_row.current_period_start, subscription_row.current_period_end) == (PERIOD_END, next_end)
    assert (subscription_row.plan_type, subscription_row.monthly_minutes_limit) == ("standard", 900)
    assert [p.period_start for p in open_periods(connection, user)] == [PERIOD_END]
    # The invoice moved the period forward without claiming the state time: plan and status stay the
    # business of subscription events, even ones of an earlier second.
    assert subscription_row.stripe_state_event_id != event["id"]
    assert f"stripe:{event['id']}" in audit_actors(connection, user)


@pytest.mark.parametrize(
    ("build", "outcome"),
    [
        (lambda sub, cus: invoice(sub, cus, start=PERIOD_START), "ignored"),  # the current period, not a new one
        (lambda sub, cus: invoice(None, cus), "ignored"),  # a one-off invoice
        (lambda sub, cus: invoice("sub_unlinked", cus), "ignored"),  # a subscription that is not ours
        (lambda sub, cus: {**invoice(sub, cus), "lines": {"object": "list", "data": []}}, "dead_lettered"),
    ],
)
def test_invoices_that_start_no_period(connection, build, outcome) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    before = row(connection, user)
    event = stripe_event("invoice.paid", build(subscription_id, customer), ts(NOW))
    assert deliver(connection, event).outcome == outcome
    assert row(connection, user).current_period_start == before.current_period_start


@pytest.mark.parametrize("api_version", SHAPES)
def test_a_failed_payment_marks_past_due_and_an_older_event_cannot_undo_it(connection, api_version) -> None:
    user, customer, subscription_id = subscribed_user(connection, api_version)
    failed = stripe_event("invoice.payment_failed", invoice(subscription_id, customer, api_version), ts(NOW))
    assert deliver(connection, failed).outcome == "applied"
    assert (row(connection, user).status, row(connection, user).stripe_state_event_id) == ("past_due", failed["id"])

    older = stripe_event("customer.subscription.updated", subscription(subscription_id, customer), ts(NOW) - 1)
    assert deliver(connection, older).outcome == "stale"
    assert row(connection, user).status == "past_due"


# -- order ---------------------------------------------------------------------------------------------------


def test_a_stale_event_is_recorded_and_changes_nothing(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    newer = subscription(subscription_id, customer, price_object=price("price_premium"))
    deliver(connection, stripe_event("customer.subscription.updated", newer, ts(NOW)))
    audit_count = len(audit_actors(connection, user))
    older = subscription(subscription_id, customer, price_object=price("price_enterprise"))
    event = stripe_event("customer.subscription.updated", older, ts(NOW) - 30)
    assert deliver(connection, event).outcome == "stale"
    assert row(connection, user).plan_type == "premium"
    assert len(audit_actors(connection, user)) == audit_count
    assert inbox(connection, event["id"]).processed_at == NOW


def test_same_second_events_take_what_stripe_says_now(connection, fake_stripe) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    second = ts(NOW)
    to_premium = subscription(subscription_id, customer, price_object=price("price_premium"))
    to_enterprise = subscription(subscription_id, customer, price_object=price("price_enterprise"))
    fake_stripe.subscriptions[subscription_id] = to_premium  # Stripe's current truth
    deliver(connection, stripe_event("customer.subscription.updated", to_premium, second))
    assert fake_stripe.requests == []  # the first event of a second needs no look-up
    deliver(connection, stripe_event("customer.subscription.updated", to_enterprise, second))
    assert row(connection, user).plan_type == "premium"
    assert fake_stripe.requests == [
        {"path": f"/v1/subscriptions/{subscription_id}", "authorization": "Bearer sk_test_fake"}
    ]


def test_same_second_payment_failure_applies_stripes_current_state(connection, fake_stripe) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    recovered = subscription(subscription_id, customer, status="active")
    fake_stripe.subscriptions[subscription_id] = recovered
    deliver(connection, stripe_event("customer.subscription.updated", recovered, ts(NOW)))
    deliver(connection, stripe_event("invoice.payment_failed", invoice(subscription_id, customer), ts(NOW)))
    assert row(connection, user).status == "active"


def test_same_second_without_an_api_key_the_later_event_wins(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    for plan in ("premium", "enterprise"):
        payload = subscription(subscription_id, customer, price_object=price(f"price_{plan}"))
        deliver(connection, stripe_event("customer.subscription.updated", payload, ts(NOW)))
    assert row(connection, user).plan_type == "enterprise"


def test_a_stripe_api_failure_is_retried_and_a_refusal_dead_lettered(connection, fake_stripe) -> None:
    _, customer, subscription_id = subscribed_user(connection)
    deliver(connection, stripe_event("customer.subscription.updated", subscription(subscription_id, customer), ts(NOW)))
    same_second = stripe_event("customer.subscription.updated", subscription(subscription_id, customer), ts(NOW))
    webhook.store(connection, same_second, NOW)
    fake_stripe.fail_status = 500
    with pytest.raises(ConnectionError, match="Stripe API unavailable"):
        stripe_inbox.process(connection, same_second["id"], NOW)
    fake_stripe.fail_status = None  # and Stripe does not know the subscription: a 404
    assert stripe_inbox.process(connection, same_second["id"], NOW).outcome == "dead_lettered"
    assert "Stripe API refused subscription" in letters(connection, same_second["id"])[0].reason


# -- bad payloads --------------------------------------------------------------------------------------------


def _without(payload: dict, *path: str) -> dict:
    target = payload
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return payload


@pytest.mark.parametrize(
    ("type_", "build", "reason"),
    [
        ("customer.subscription.updated", lambda: _without(subscription("sub_1", "cus_1"), "id"), "not a subscription"),
        ("customer.subscription.updated", lambda: _without(subscription("sub_1", "cus_1"), "status"), "no status"),
        ("customer.subscription.updated", lambda: {**subscription("sub_1", "cus_1"), "items": {}}, "has no items"),
        (
            "customer.subscription.updated",
            lambda: _without(subscription("sub_1", "cus_1"), "items", "data", 0, "current_period_start"),
            "has no current period",
        ),
        (
            "customer.subscription.updated",
            lambda: _without(subscription("sub_1", "cus_1"), "items", "data", 0, "price"),
            "has no price",
        ),
        ("customer.subscription.updated", lambda: subscription("sub_1", "cus_1", status="weird"), "unknown status"),
        (
            "customer.subscription.created",
            lambda: subscription("sub_1", "cus_1", price_object=price("price_x", plan="gold")),
            "unknown plan 'gold'",
        ),
        (
            "customer.subscription.created",
            lambda: subscription("sub_1", "cus_1", price_object=price("price_x", plan="premium", monthly_minutes="-5")),
            "not a whole number",
        ),
        ("customer.subscription.updated", lambda: {"object": "customer", "id": "cus_1"}, "not a subscription"),
        ("invoice.paid", lambda: _without(invoice("sub_1", "cus_1"), "lines"), "no line with a period"),
    ],
)
def test_a_payload_missing_what_it_needs_is_dead_lettered_with_its_reason(connection, type_, build, reason) -> None:
    user = linked_user(connection, "cus_1")
    deliver(connection, stripe_event("checkout.session.completed", checkout_session("cus_1", "sub_1", user), 1))
    event = stripe_event(type_, build(), ts(NOW))
    assert deliver(connection, event).outcome == "dead_lettered"
    (letter,) = letters(connection, event["id"])
    assert reason in letter.reason
    assert (letter.task_name, letter.payload["id"]) == ("stripe.process_event", event["id"])
    assert row(connection, user).plan_type == "free"


def test_an_unhandled_type_is_stored_and_ignored(connection) -> None:
    event = stripe_event("customer.created", {"object": "customer", "id": "cus_new"}, 5)
    assert deliver(connection, event).outcome == "ignored"
    assert inbox(connection, event["id"]).processed_at == NOW


def test_a_processed_event_is_never_applied_twice(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    event = stripe_event(
        "customer.subscription.updated", subscription(subscription_id, customer, status="paused"), ts(NOW)
    )
    first = deliver(connection, event)
    audit_count = len(audit_actors(connection, user))
    again = deliver(connection, event)
    assert (first.already, again.already, again.outcome, again.user_id) == (False, True, "applied", None)
    assert len(audit_actors(connection, user)) == audit_count
    assert inbox(connection, event["id"]).attempts == 1


def test_an_event_not_in_the_inbox_is_rejected(connection) -> None:
    with pytest.raises(Rejected, match="not in stripe_events"):
        stripe_inbox.process(connection, "evt_never_stored", NOW)
    with pytest.raises(Rejected, match="not in stripe_events"):
        stripe_inbox.replay_event(connection, {"not": "an event"}, NOW)


# -- the sweep -----------------------------------------------------------------------------------------------


def stored(connection: sa.Connection, received_at: datetime, **columns: Any) -> str:
    event = stripe_event("customer.created", {"object": "customer", "id": new_id("cus")}, ts(received_at))
    webhook.store(connection, event, received_at)
    if columns:
        assignments = ", ".join(f"{name} = :{name}" for name in columns)
        connection.execute(
            sa.text(f"UPDATE stripe_events SET {assignments} WHERE id = :id"), {**columns, "id": event["id"]}
        )
    return event["id"]


def test_the_sweep_requeues_rows_whose_message_was_lost(connection) -> None:
    lost = stored(connection, NOW - timedelta(minutes=10))
    recent = stored(connection, NOW - timedelta(minutes=1))  # its message is presumably still queued
    tried_recently = stored(connection, NOW - timedelta(minutes=10), attempts=1, last_attempt_at=NOW)
    done = stored(connection, NOW - timedelta(minutes=10))
    stripe_inbox.process(connection, done, NOW - timedelta(minutes=9))

    result = stripe_inbox.sweep(connection, NOW)
    assert lost in result.requeue
    assert {recent, tried_recently, done}.isdisjoint(result.requeue)
    assert lost not in stripe_inbox.sweep(connection, NOW + timedelta(minutes=1)).requeue  # once per 5 minutes
    assert lost in stripe_inbox.sweep(connection, NOW + timedelta(minutes=6)).requeue


def test_the_sweep_gives_up_on_rows_that_keep_failing(connection) -> None:
    failing = stored(
        connection,
        NOW - timedelta(hours=1),
        attempts=stripe_inbox.MAX_ATTEMPTS,
        last_error="OperationalError: boom",
        last_attempt_at=NOW - timedelta(minutes=6),
    )
    lettered = stored(connection, NOW - timedelta(hours=1), attempts=1, last_attempt_at=NOW - timedelta(minutes=6))
    dead_letters.write(connection, [dead_letters.Letter("stripe", {"id": lettered}, "TypeError: bug", lettered)], NOW)

    result = stripe_inbox.sweep(connection, NOW)
    assert {failing, lettered} <= set(result.dead_lettered)
    assert not {failing, lettered} & set(result.requeue)
    (letter,) = letters(connection, failing)
    assert letter.reason == f"gave up after {stripe_inbox.MAX_ATTEMPTS} attempts: OperationalError: boom"
    assert len(letters(connection, lettered)) == 1  # the task's letter, not a second one
    assert {inbox(connection, i).outcome for i in (failing, lettered)} == {"dead_lettered"}
    assert failing not in stripe_inbox.sweep(connection, NOW + timedelta(hours=1)).dead_lettered


def test_a_failed_try_is_counted(connection) -> None:
    event_id = stored(connection, NOW)
    stripe_inbox.record_failure(connection, event_id, "OperationalError: server closed the connection", NOW)
    inbox_row = inbox(connection, event_id)
    assert (inbox_row.attempts, inbox_row.last_attempt_at, inbox_row.processed_at) == (1, NOW, None)
    assert inbox_row.last_error.startswith("OperationalError")


# -- usage follows its time when Stripe moves period bounds -------------------------------------------------


def test_usage_metered_before_a_new_period_starts_moves_into_it(connection) -> None:
    customer, subscription_id = new_id("cus"), new_id("sub")
    user = linked_user(connection, customer)
    start = NOW.replace(hour=11, minute=0)
    metered(connection, user, start + timedelta(minutes=5), 600, NOW)  # on the free plan, inside [11:00, ...)
    created = stripe_event(
        "customer.subscription.created",
        subscription(subscription_id, customer, start=start, end=start + timedelta(days=31)),
        ts(NOW),
    )
    assert deliver(connection, created).outcome == "applied"
    assert period_usage(connection, user) == [
        (MARCH[0], start, 0),
        (start, start + timedelta(days=31), 600_000),
    ]
    assert row(connection, user).monthly_minutes_used == 10


def test_a_new_anchor_replaces_a_predicted_period_instead_of_overlapping_it(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    before_end = PERIOD_END - timedelta(minutes=2)
    metered(connection, user, before_end, 600, before_end)  # reaches into the predicted next period
    assert len(period_usage(connection, user)) == 3  # March (free), Stripe's period, the predicted next one
    anchor = PERIOD_END - timedelta(minutes=1)
    updated = stripe_event(
        "customer.subscription.updated",
        subscription(subscription_id, customer, price_object=price("price_premium"), start=anchor,
                     end=anchor + timedelta(days=30)),
        ts(anchor),
    )  # fmt: skip
    assert deliver(connection, updated, anchor).outcome == "applied"
    usage = period_usage(connection, user)
    for (_, end, _), (next_start, _, _) in itertools.pairwise(usage):
        assert end <= next_start, usage  # no two periods overlap
    assert [(start, ms) for start, _, ms in usage if ms] == [(PERIOD_START, 60_000), (anchor, 540_000)]
    assert (anchor, anchor + timedelta(days=30), 540_000) in usage
    assert row(connection, user).plan_type == "premium"


def test_an_update_for_a_period_that_ended_before_the_reset_ran_changes_the_state(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    after_end = PERIOD_END + timedelta(minutes=1)  # the reset has not run yet
    updated = stripe_event(
        "customer.subscription.updated",
        subscription(subscription_id, customer, cancel_at_period_end=True),
        ts(PERIOD_END - timedelta(minutes=1)),
    )
    assert deliver(connection, updated, after_end).outcome == "applied"
    assert row(connection, user).cancel_at_period_end is True


def test_a_subscription_event_that_came_before_its_checkout_is_applied_by_the_checkout(connection) -> None:
    user, customer, subscription_id = insert_user(connection), new_id("cus"), new_id("sub")
    created = stripe_event(
        "customer.subscription.created",
        subscription(subscription_id, customer, price_object=price("price_premium")),
        ts(PERIOD_START),
    )
    assert deliver(connection, created, PERIOD_START).outcome == "dead_lettered"
    (letter,) = letters(connection, created["id"])
    assert letter.reason.startswith("no user for Stripe customer")
    checkout = stripe_event("checkout.session.completed", checkout_session(customer, subscription_id, user), ts(NOW))
    assert deliver(connection, checkout).outcome == "applied"
    subscription_row = row(connection, user)
    assert (subscription_row.plan_type, subscription_row.stripe_subscription_id) == ("premium", subscription_id)
    (letter,) = letters(connection, created["id"])
    assert letter.replayed_at == NOW
    assert inbox(connection, created["id"]).outcome == "applied"


def test_a_downgrade_below_the_usage_raises_the_alerts_and_blocks(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)  # standard: 900 minutes
    metered(connection, user, NOW - timedelta(hours=5), 14_400, NOW)  # 240 minutes
    updated = stripe_event(
        "customer.subscription.updated",
        subscription(subscription_id, customer, price_object=price("price_cheap", plan="free")),
        ts(NOW),
    )
    assert deliver(connection, updated).outcome == "applied"
    query = "SELECT threshold_percent FROM usage_alerts WHERE user_id = :u AND period_start = :s ORDER BY 1"
    assert list(connection.scalars(sa.text(query), {"u": user, "s": PERIOD_START})) == [80, 100]
    assert row(connection, user).limit_reached_at is not None
