"""Stripe as it really behaves (issue 11): plan changes invoiced at once with proration lines, several
subscriptions of one learner, payloads from before prices, one write of the user's row per event, and no
network call under row locks (a slow Stripe API never holds a metering batch)."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from support.factories import insert_user
from support.stripe import (
    API_BEFORE_PRICES,
    NOW,
    PERIOD_END,
    PERIOD_START,
    SHAPES,
    FakeStripe,
    checkout_session,
    deliver,
    invoice,
    legacy_plan,
    linked_user,
    metered,
    new_id,
    open_periods,
    period_usage,
    price,
    proration_invoice,
    row,
    stripe_event,
    stripe_stand_in,
    subscribed_user,
    subscription,
    ts,
)

from worker import db
from worker.metering import pipeline
from worker.stripe import inbox, webhook

AMOUNTS = {"standard": 1500, "premium": 3000}  # cents a month
MARCH_START = datetime(2027, 3, 1, tzinfo=UTC)
BOUNDED_WAIT = 20.0  # seconds: the longest a test waits for another thread before it fails


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with stripe_stand_in() as fake:
        yield fake


def priced(plan: str) -> dict:
    return price(f"price_{plan}", AMOUNTS[plan])


# -- plan changes invoiced at once ---------------------------------------------------------------------------


@pytest.mark.parametrize("api_version", SHAPES)
@pytest.mark.parametrize(("before", "after"), [("standard", "premium"), ("premium", "standard")])
@pytest.mark.parametrize("invoice_first", [True, False])
def test_a_plan_change_invoiced_with_proration_lines_only_keeps_period_and_usage(
    connection, api_version, before, after, invoice_first
) -> None:
    user, customer, subscription_id = subscribed_user(connection, api_version)  # standard from PERIOD_START
    if before != "standard":
        changed = subscription(subscription_id, customer, api_version, price_object=priced(before))
        deliver(connection, stripe_event("customer.subscription.updated", changed, ts(PERIOD_START) + 60, api_version))
    metered(connection, user, NOW - timedelta(hours=3), 1800, NOW)  # 30 minutes of this period
    at = NOW - timedelta(hours=1)
    updated = stripe_event(
        "customer.subscription.updated",
        subscription(subscription_id, customer, api_version, price_object=priced(after)),
        ts(at),
        api_version,
    )
    amounts = (-1000, 2000) if after == "premium" else (-2000, 1000)  # credit for the old price, charge for the new
    prorations = proration_invoice(
        subscription_id, customer, api_version, at, PERIOD_END, f"price_{before}", f"price_{after}", amounts
    )
    paid = stripe_event("invoice.paid", prorations, ts(at) + 2, api_version)

    for event in [paid, updated] if invoice_first else [updated, paid]:
        outcome = deliver(connection, event).outcome
        assert outcome == ("ignored" if event is paid else "applied"), event["type"]

    subscription_row = row(connection, user)
    assert (subscription_row.current_period_start, subscription_row.current_period_end) == (PERIOD_START, PERIOD_END)
    assert (subscription_row.plan_type, subscription_row.monthly_minutes_used) == (after, 30)
    assert period_usage(connection, user) == [(MARCH_START, PERIOD_START, 0), (PERIOD_START, PERIOD_END, 1_800_000)]
    assert [(p.plan_type, p.archived_at) for p in open_periods(connection, user)] == [(after, None)]


@pytest.mark.parametrize("api_version", SHAPES)
def test_a_cycle_invoice_still_moves_the_period_after_a_proration_invoice(connection, api_version) -> None:
    user, customer, subscription_id = subscribed_user(connection, api_version)
    at = NOW - timedelta(hours=1)
    prorations = proration_invoice(subscription_id, customer, api_version, at, PERIOD_END, "price_standard", "price_x")
    assert deliver(connection, stripe_event("invoice.paid", prorations, ts(at), api_version)).outcome == "ignored"
    next_end = PERIOD_END + timedelta(days=30)
    cycle = invoice(subscription_id, customer, api_version, PERIOD_END, next_end)
    after_end = PERIOD_END + timedelta(hours=1)
    assert deliver(connection, stripe_event("invoice.paid", cycle, ts(after_end), api_version), after_end).outcome == (
        "applied"
    )
    assert (row(connection, user).current_period_start, row(connection, user).current_period_end) == (
        PERIOD_END,
        next_end,
    )


def test_a_failed_first_payment_leaves_the_subscription_as_it_is(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    first = invoice(subscription_id, customer, billing_reason="subscription_create")
    assert deliver(connection, stripe_event("invoice.payment_failed", first, ts(NOW))).outcome == "ignored"
    assert row(connection, user).status == "active"


# -- several subscriptions of one learner --------------------------------------------------------------------

B_START = PERIOD_START + timedelta(days=1)  # the second Checkout, a day into the first subscription's period
B_END = B_START + timedelta(days=31)


def two_subscriptions(user: uuid.UUID, customer: str, a_plan: str, b_plan: str) -> list[dict]:
    """The first subscription A created, a second one B bought a day later, then A set to cancel and ended."""
    a, b = new_id("sub"), new_id("sub")

    def state(subscription_id: str, plan: str, start: datetime, end: datetime, **fields) -> dict:
        return subscription(subscription_id, customer, price_object=priced(plan), start=start, end=end,
                            user_id=user, created=ts(start), **fields)  # fmt: skip

    day = 24 * 3600
    return [
        stripe_event("customer.subscription.created", state(a, a_plan, PERIOD_START, PERIOD_END), ts(PERIOD_START)),
        stripe_event("customer.subscription.created", state(b, b_plan, B_START, B_END), ts(B_START)),
        stripe_event(
            "customer.subscription.updated",
            state(a, a_plan, PERIOD_START, PERIOD_END, cancel_at_period_end=True),
            ts(PERIOD_START) + 2 * day,
        ),
        stripe_event(
            "customer.subscription.deleted",
            state(a, a_plan, PERIOD_START, PERIOD_END, status="canceled", canceled_at=ts(PERIOD_START) + 3 * day),
            ts(PERIOD_START) + 3 * day,
        ),
    ]


def in_force(processed: list[dict]) -> str | None:
    """What the learner's row must follow: of each subscription's newest state, the live one that pays most,
    then the one created last."""
    newest: dict[str, dict] = {}
    for event in processed:
        obj = event["data"]["object"]
        if obj["id"] not in newest or event["created"] > newest[obj["id"]]["created"]:
            newest[obj["id"]] = {"created": event["created"], "object": obj}
    live = [state["object"] for state in newest.values() if state["object"]["status"] == "active"]
    pays = lambda obj: (obj["items"]["data"][0]["price"]["unit_amount"], obj["created"])  # noqa: E731
    return max(live, key=pays)["id"] if live else None


def audited_subscriptions(connection: sa.Connection, user: uuid.UUID, event_id: str) -> list[str]:
    """The deciding subscription named by each audit_logs row the event wrote for the user's row."""
    query = """SELECT new_values ->> 'stripe_subscription_id' FROM audit_logs
               WHERE user_id = :u AND table_name = 'subscriptions' AND actor = :actor"""
    return list(connection.scalars(sa.text(query), {"u": user, "actor": f"stripe:{event_id}"}))


@pytest.mark.parametrize(
    ("a_plan", "b_plan"), [("standard", "premium"), ("standard", "standard"), ("premium", "standard")]
)
@pytest.mark.parametrize("order", list(itertools.permutations(range(4))), ids=lambda order: "".join(map(str, order)))
def test_two_subscriptions_of_one_learner_in_every_order(connection, a_plan, b_plan, order) -> None:
    customer = new_id("cus")
    user = linked_user(connection, customer)
    events = two_subscriptions(user, customer, a_plan, b_plan)
    a, b = events[0]["data"]["object"]["id"], events[1]["data"]["object"]["id"]
    processed: list[dict] = []
    for index in order:
        before = in_force(processed)
        outcome = deliver(connection, events[index]).outcome
        processed.append(events[index])
        expected = in_force(processed)
        subscription_row = row(connection, user)
        if expected is None:
            assert subscription_row.plan_type == "free", (order, index)
        else:
            assert subscription_row.stripe_subscription_id == expected, (order, index)
        if outcome == "applied":  # its audit row names the subscription that decided
            assert audited_subscriptions(connection, user, events[index]["id"]) == [
                subscription_row.stripe_subscription_id
            ]
        if index == 3 and before == b:  # the older one ended while the newer one was in force: nothing changes
            assert outcome == "ignored", order
        if index == 3 and b in {event["data"]["object"]["id"] for event in processed}:
            assert subscription_row.stripe_subscription_id == b, order  # the newer one is in force after it

    final = row(connection, user)
    assert (final.stripe_subscription_id, final.plan_type, final.status, final.stripe_status) == (
        b,
        b_plan,
        "active",
        "active",
    )
    assert (final.current_period_start, final.current_period_end) == (B_START, B_END)
    assert a != b


def test_the_learner_is_back_on_the_free_plan_when_every_subscription_has_ended(connection) -> None:
    customer = new_id("cus")
    user = linked_user(connection, customer)
    events = two_subscriptions(user, customer, "standard", "premium")
    for event in events:
        deliver(connection, event)
    b = events[1]["data"]["object"]
    ended = stripe_event("customer.subscription.deleted", {**b, "status": "canceled"}, ts(NOW))
    assert deliver(connection, ended).outcome == "applied"
    subscription_row = row(connection, user)
    assert (subscription_row.plan_type, subscription_row.status, subscription_row.stripe_subscription_id) == (
        "free",
        "canceled",
        b["id"],
    )


# -- payloads from before prices --------------------------------------------------------------------------------


def test_a_pre_price_subscription_is_applied_through_its_plan(connection) -> None:
    customer, subscription_id = new_id("cus"), new_id("sub")
    user = linked_user(connection, customer)
    gold = legacy_plan("gold_monthly", 3000, name="Gold", plan="premium", monthly_minutes="3500")
    created = subscription(subscription_id, customer, API_BEFORE_PRICES, plan_object=gold)
    event = stripe_event("customer.subscription.created", created, ts(PERIOD_START), API_BEFORE_PRICES)
    assert deliver(connection, event).outcome == "applied"
    subscription_row = row(connection, user)
    assert (subscription_row.plan_type, subscription_row.monthly_minutes_limit) == ("premium", 3500)
    assert (subscription_row.stripe_price_id, subscription_row.monthly_price_cents) == ("gold_monthly", 3000)
    assert (subscription_row.current_period_start, subscription_row.current_period_end) == (PERIOD_START, PERIOD_END)

    next_end = PERIOD_END + timedelta(days=30)
    renewal = invoice(subscription_id, customer, API_BEFORE_PRICES, PERIOD_END, next_end)
    renewal["lines"]["data"][0]["plan"] = gold  # lines of those versions name their plan, not a price
    assert "price" not in renewal["lines"]["data"][0]
    after_end = PERIOD_END + timedelta(minutes=5)
    paid = stripe_event("invoice.paid", renewal, ts(after_end), API_BEFORE_PRICES)
    assert deliver(connection, paid, after_end).outcome == "applied"
    assert (row(connection, user).current_period_start, row(connection, user).plan_type) == (PERIOD_END, "premium")


# -- one write of the user's row per event ---------------------------------------------------------------------

COUNT_WRITES = [
    "CREATE TEMP TABLE subscription_writes (user_id uuid) ON COMMIT DROP",
    """CREATE FUNCTION count_subscription_write() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
       AS $$ BEGIN INSERT INTO subscription_writes VALUES (NEW.user_id); RETURN NULL; END $$""",
    """CREATE TRIGGER count_subscription_writes AFTER UPDATE ON subscriptions
       FOR EACH ROW EXECUTE FUNCTION count_subscription_write()""",
]  # in the test's transaction, rolled back with it


def writes(connection: sa.Connection, user: uuid.UUID) -> int:
    return connection.scalar(sa.text("SELECT count(*) FROM subscription_writes WHERE user_id = :u"), {"u": user})


@pytest.mark.parametrize("change", ["new period with usage", "renewal", "plan change", "deletion"])
def test_one_event_writes_the_users_row_once(connection, change) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    metered(connection, user, NOW - timedelta(hours=2), 600, NOW)
    for statement in COUNT_WRITES:
        connection.execute(sa.text(statement))
    start = NOW - timedelta(hours=3)
    events = {
        "new period with usage": stripe_event(
            "customer.subscription.updated",
            subscription(subscription_id, customer, start=start, end=start + timedelta(days=31)),
            ts(NOW),
        ),
        "renewal": stripe_event(
            "invoice.paid", invoice(subscription_id, customer, start=PERIOD_END, end=PERIOD_END + timedelta(days=30)),
            ts(PERIOD_END),
        ),
        "plan change": stripe_event(
            "customer.subscription.updated", subscription(subscription_id, customer, price_object=priced("premium")),
            ts(NOW),
        ),
        "deletion": stripe_event(
            "customer.subscription.deleted", subscription(subscription_id, customer, status="canceled"), ts(NOW)
        ),
    }  # fmt: skip
    now = PERIOD_END + timedelta(minutes=1) if change == "renewal" else NOW
    assert deliver(connection, events[change], now).outcome == "applied"
    assert writes(connection, user) == 1
    subscription_row = row(connection, user)
    assert subscription_row.monthly_minutes_used == (0 if change == "renewal" else 10)
    period = [p for p in open_periods(connection, user) if p.period_start == subscription_row.current_period_start]
    assert period and period[0].limit_ms == subscription_row.monthly_minutes_limit * 60_000


# -- no network call under row locks ---------------------------------------------------------------------------


def committed_subscriber() -> tuple[uuid.UUID, str, str]:
    with db.transaction() as conn:
        user, customer, subscription_id = subscribed_user(conn)
        latest = stripe_event("customer.subscription.updated", subscription(subscription_id, customer), ts(NOW))
        assert deliver(conn, latest).outcome == "applied"
    return user, customer, subscription_id


def stored(event: dict) -> str:
    with db.transaction() as conn:
        webhook.store(conn, event, NOW)
    return event["id"]


def in_thread(target, *args) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = target(*args)
        except Exception as exc:  # reported by the test that reads `result`
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def metering_batch(user: uuid.UUID, seconds: int) -> None:
    usage = {"event_id": new_id("use"), "user_id": str(user), "started_at": (NOW - timedelta(hours=1)).isoformat(),
             "seconds": seconds, "language": "en"}  # fmt: skip
    with db.transaction() as conn:
        assert pipeline.apply_events(conn, [usage], NOW).accepted


def test_a_slow_stripe_api_does_not_hold_a_metering_batch_of_the_same_user(committed, fake_stripe) -> None:
    user, customer, subscription_id = committed_subscriber()
    fake_stripe.subscriptions[subscription_id] = subscription(subscription_id, customer, price_object=priced("premium"))
    fake_stripe.hold = threading.Event()  # Stripe answers only when the test says so
    same_second = stored(
        stripe_event("customer.subscription.updated", subscription(subscription_id, customer), ts(NOW))
    )
    stripe_thread, processed = in_thread(inbox.process_apart, same_second, NOW)
    assert fake_stripe.holding.wait(BOUNDED_WAIT), "the event never asked Stripe's API"

    metering_thread, metered_result = in_thread(metering_batch, user, 600)
    metering_thread.join(BOUNDED_WAIT)
    committed_while_stripe_answered_nothing = not metering_thread.is_alive()
    fake_stripe.hold.set()
    stripe_thread.join(BOUNDED_WAIT)
    metering_thread.join(BOUNDED_WAIT)

    assert committed_while_stripe_answered_nothing, "the metering batch waited for Stripe's answer"
    assert "error" not in metered_result and "error" not in processed, (metered_result, processed)
    assert processed["value"].outcome == "applied"
    with db.engine().connect() as conn:
        subscription_row = row(conn, user)
    assert (subscription_row.plan_type, subscription_row.monthly_minutes_used) == ("premium", 10)


def test_a_state_that_moved_while_stripe_was_asked_is_checked_again(committed, fake_stripe) -> None:
    user, customer, subscription_id = committed_subscriber()
    fake_stripe.subscriptions[subscription_id] = subscription(subscription_id, customer, price_object=priced("premium"))
    fake_stripe.hold = threading.Event()
    same_second = stored(
        stripe_event("customer.subscription.updated", subscription(subscription_id, customer), ts(NOW))
    )
    stripe_thread, processed = in_thread(inbox.process_apart, same_second, NOW)
    assert fake_stripe.holding.wait(BOUNDED_WAIT), "the event never asked Stripe's API"

    newer = stripe_event(
        "customer.subscription.updated",
        subscription(subscription_id, customer, price_object=price("price_enterprise")),
        ts(NOW) + 10,
    )
    with db.transaction() as conn:  # applied while the first one waits for Stripe: it holds no lock
        assert deliver(conn, newer).outcome == "applied"
    fake_stripe.hold.set()
    stripe_thread.join(BOUNDED_WAIT)

    assert "error" not in processed, processed
    assert processed["value"].outcome == "stale"  # checked again under its locks: the state had moved on
    with db.engine().connect() as conn:
        assert row(conn, user).plan_type == "enterprise"


def test_a_checkout_replaying_events_of_one_second_fetches_before_its_locks(connection, fake_stripe) -> None:
    user, customer, subscription_id = insert_user(connection), new_id("cus"), new_id("sub")
    second = ts(PERIOD_START)
    created = stripe_event("customer.subscription.created", subscription(subscription_id, customer), second)
    premium = subscription(subscription_id, customer, price_object=priced("premium"))
    updated = stripe_event("customer.subscription.updated", premium, second)
    for event in (created, updated):  # before the checkout: no user yet
        assert deliver(connection, event).outcome == "dead_lettered"
    fake_stripe.subscriptions[subscription_id] = premium

    checkout = stripe_event("checkout.session.completed", checkout_session(customer, subscription_id, user), second + 1)
    assert deliver(connection, checkout).outcome == "applied"

    assert (row(connection, user).plan_type, row(connection, user).stripe_subscription_id) == (
        "premium",
        subscription_id,
    )
    assert [r["path"] for r in fake_stripe.requests] == [f"/v1/subscriptions/{subscription_id}"]  # once, lock-free
    replayed = connection.execute(
        sa.text("SELECT ref, replayed_at FROM dead_letters WHERE source = 'stripe' ORDER BY id")
    ).all()
    assert {(letter.ref, letter.replayed_at) for letter in replayed} == {(created["id"], NOW), (updated["id"], NOW)}


def test_an_event_of_the_last_period_after_the_invoice_of_the_next_moves_no_period_back(connection) -> None:
    user, customer, subscription_id = subscribed_user(connection)
    next_end = PERIOD_END + timedelta(days=30)
    after_end = PERIOD_END + timedelta(hours=1)
    paid = stripe_event(
        "invoice.paid", invoice(subscription_id, customer, start=PERIOD_END, end=next_end), ts(after_end)
    )
    assert deliver(connection, paid, after_end).outcome == "applied"
    # Set to cancel at the end of the period that just ended, delivered late: its period is the old one.
    late = subscription(subscription_id, customer, cancel_at_period_end=True)
    assert deliver(
        connection, stripe_event("customer.subscription.updated", late, ts(after_end) + 1), after_end
    ).outcome == ("applied")
    subscription_row = row(connection, user)
    assert (subscription_row.current_period_start, subscription_row.current_period_end) == (PERIOD_END, next_end)
    assert subscription_row.cancel_at_period_end is True
    stored = connection.execute(
        sa.text("SELECT current_period_start, current_period_end FROM stripe_subscriptions WHERE id = :id"),
        {"id": subscription_id},
    ).one()
    assert tuple(stored) == (PERIOD_END, next_end)
