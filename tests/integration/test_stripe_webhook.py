"""Stripe end to end: payloads signed as Stripe signs them, posted over real HTTP to the running web app,
processed by a real Celery worker, with a local HTTP server answering like Stripe's API."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from support.factories import insert_user
from support.http_server import serve_in_thread
from support.run import environment
from support.stripe import FakeStripe, checkout_session, new_id, price, stripe_event, stripe_stand_in, subscription, ts

from worker import cli, db, health
from worker.stripe import inbox, webhook
from worker.tasks.stripe import process_event

pytestmark = pytest.mark.usefixtures("committed")


@pytest.fixture(scope="module")
def web_url() -> Iterator[str]:
    """The webhook route of the web app, served over real HTTP from a thread of this process."""
    from worker.web import app as web_app

    with serve_in_thread(web_app) as base_url:
        yield f"{base_url}/webhooks/stripe"


@pytest.fixture
def stripe_api() -> Iterator[FakeStripe]:
    with stripe_stand_in() as fake:
        yield fake


def signature(body: str, secret: str = "whsec_test_current", timestamp: int | None = None) -> str:
    """Stripe-Signature as Stripe computes it: v1 = HMAC-SHA256(secret, "{t}.{body}")."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def post(url: str, event: dict, secret: str = "whsec_test_current") -> httpx.Response:
    body = json.dumps(event)
    return httpx.post(url, content=body, headers={"Stripe-Signature": signature(body, secret)}, timeout=10)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def query(sql: str, **params: Any) -> list[sa.Row]:
    with db.engine().connect() as conn:
        return conn.execute(sa.text(sql), params).all()


def outcomes(*event_ids: str) -> dict[str, str]:
    rows = query(
        "SELECT id, outcome FROM stripe_events WHERE id = ANY(:ids) AND processed_at IS NOT NULL", ids=list(event_ids)
    )
    return {row.id: row.outcome for row in rows}


def deliver(url: str, event: dict, secret: str = "whsec_test_current") -> str:
    """Post an event, expect it accepted, and wait for the worker to process it; returns its outcome."""
    response = post(url, event, secret)
    assert response.status_code == 200, response.text
    return wait_until(lambda: outcomes(event["id"]).get(event["id"]), f"event {event['id']} processed")


def subscription_of(user: uuid.UUID) -> sa.Row:
    (row,) = query("SELECT * FROM subscriptions WHERE user_id = :u", u=user)
    return row


def new_user(**profile: Any) -> uuid.UUID:
    with db.transaction() as conn:
        return insert_user(conn, **profile)


# -- the receiver --------------------------------------------------------------------------------------------


def test_a_signed_event_is_stored_before_the_answer_and_applied_by_the_worker(
    thread_worker, web_url, redis_client
) -> None:
    user = new_user()
    applied_before = stripe_events_counted("customer.subscription.created", "applied")
    redis_client.set(f"quota:{user}", "{}")  # a cached quota answer, to be dropped once the plan changes
    customer, subscription_id = new_id("cus"), new_id("sub")
    checkout = stripe_event("checkout.session.completed", checkout_session(customer, subscription_id, user), ts_now())
    assert deliver(web_url, checkout) == "applied"
    created = stripe_event(
        "customer.subscription.created",
        subscription(subscription_id, customer, price_object=price("price_premium"), start=now(), end=now() + MONTH),
        ts_now(),
    )
    response = post(web_url, created, secret="whsec_test_previous")  # signed with the rotated-out secret
    assert (response.status_code, response.json()) == (200, {"received": True, "duplicate": False})
    wait_until(lambda: outcomes(created["id"]), "the subscription event processed")

    row = subscription_of(user)
    assert (row.plan_type, row.monthly_minutes_limit, row.status) == ("premium", 3000, "active")
    assert (row.stripe_customer_id, row.stripe_subscription_id) == (customer, subscription_id)
    (stored,) = query("SELECT * FROM stripe_events WHERE id = :id", id=created["id"])
    assert (stored.type, stored.api_version, stored.livemode, stored.payload) == (
        "customer.subscription.created",
        created["api_version"],
        False,
        created,
    )
    wait_until(lambda: not redis_client.exists(f"quota:{user}"), "the cached quota dropped")
    assert stripe_events_counted("customer.subscription.created", "applied") == applied_before + 1


def stripe_events_counted(event_type: str, outcome: str) -> float:
    """worldspeak_stripe_events_total for one type and outcome, summed over this host's processes."""
    body, _ = health.exposition()
    labels = {"type": event_type, "outcome": outcome}
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "worldspeak_stripe_events_total" and sample.labels == labels
    )


def test_duplicate_deliveries_are_answered_200_and_applied_once(thread_worker, web_url) -> None:
    user = new_user()
    event = stripe_event("checkout.session.completed", checkout_session("cus_dup", None, user), ts_now())
    body = json.dumps(event)
    headers = {"Stripe-Signature": signature(body)}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: httpx.post(web_url, content=body, headers=headers, timeout=10), range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert sorted(r.json()["duplicate"] for r in responses) == [False, True, True, True]
    wait_until(lambda: outcomes(event["id"]), "the event processed")
    assert post(web_url, event).json() == {"received": True, "duplicate": True}  # and later, once processed
    time.sleep(0.3)  # room for a wrongly queued second run to show
    (stored,) = query("SELECT attempts, outcome FROM stripe_events WHERE id = :id", id=event["id"])
    assert (stored.attempts, stored.outcome) == (1, "applied")
    actors = query("SELECT actor FROM audit_logs WHERE user_id = :u AND table_name = 'subscriptions'", u=user)
    assert len(actors) == 2  # the free subscription created for the user, then the link: once each
    assert subscription_of(user).stripe_customer_id == "cus_dup"


def _body(event: dict) -> str:
    return json.dumps(event)


REJECTIONS = {
    "wrong secret": (lambda b: b, lambda b: signature(b, "whsec_wrong"), "does not match"),
    "stale timestamp": (lambda b: b, lambda b: signature(b, timestamp=int(time.time()) - 301), "more than 300 s old"),
    "missing header": (lambda b: b, lambda b: None, "missing Stripe-Signature header"),
    "malformed header": (lambda b: b, lambda b: "t=yesterday,v1=abc", "does not match"),
    "truncated body": (lambda b: b[: len(b) // 2], lambda b: signature(b), "does not match"),
    "truncated body, signed": (lambda b: b[: len(b) // 2], lambda b: signature(b[: len(b) // 2]), "not JSON"),
    "not JSON": (lambda b: "<html>hello</html>", lambda b: signature("<html>hello</html>"), "not JSON"),
    "not UTF-8": (lambda b: b"\xff\xfe{}", lambda b: signature("{}"), "not UTF-8"),
    "JSON, not an event": (lambda b: "[1, 2]", lambda b: signature("[1, 2]"), "not a Stripe event"),
    "event without data": (
        lambda b: json.dumps({**json.loads(b), "data": None}),
        lambda b: signature(json.dumps({**json.loads(b), "data": None})),
        "no data.object",
    ),
    "event without id": (
        lambda b: json.dumps({**json.loads(b), "id": ""}),
        lambda b: signature(json.dumps({**json.loads(b), "id": ""})),
        "id must be a string",
    ),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_a_delivery_that_is_not_a_verified_stripe_event_gets_400_and_stores_nothing(web_url, case) -> None:
    make_body, make_header, reason = REJECTIONS[case]
    body = _body(stripe_event("checkout.session.completed", checkout_session("cus_x", None, uuid.uuid4()), 1))
    headers = {} if make_header(body) is None else {"Stripe-Signature": make_header(body)}
    sent = make_body(body)
    response = httpx.post(web_url, content=sent.encode() if isinstance(sent, str) else sent, headers=headers)
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert query("SELECT count(*) FROM stripe_events")[0][0] == 0


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_one_megabyte_gets_413(web_url, declared) -> None:
    event = stripe_event("customer.created", {"object": "customer", "id": "cus_big", "description": "x" * 1_100_000}, 1)
    body = json.dumps(event).encode()
    headers = {"Stripe-Signature": signature(body.decode())}
    content = body if declared else iter([body[i : i + 65536] for i in range(0, len(body), 65536)])  # chunked
    response = httpx.post(web_url, content=content, headers=headers, timeout=10)
    assert response.status_code == 413
    assert query("SELECT count(*) FROM stripe_events")[0][0] == 0


def test_without_signing_secrets_nothing_is_accepted(web_url) -> None:
    event = stripe_event("customer.created", {"object": "customer", "id": "cus_1"}, 1)
    with environment(STRIPE_WEBHOOK_SECRETS=""):
        assert post(web_url, event).status_code == 503
    assert query("SELECT count(*) FROM stripe_events")[0][0] == 0


# -- order, through the worker -------------------------------------------------------------------------------

MONTH = timedelta(days=30)


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def ts_now() -> int:
    return ts(now())


def lifecycle(user: uuid.UUID, start: datetime, end: datetime, first: int) -> list[dict]:
    """created (standard), updated (plan change to premium), deleted: one subscription, ten seconds apart."""
    customer, subscription_id = new_id("cus"), new_id("sub")
    states = [("created", "active", "standard"), ("updated", "active", "premium"), ("deleted", "canceled", "premium")]
    return [
        stripe_event(
            f"customer.subscription.{change}",
            subscription(subscription_id, customer, status=status, price_object=price(f"price_{plan}"),
                         start=start, end=end, user_id=user),
            first + 10 * step,
        )
        for step, (change, status, plan) in enumerate(states)
    ]  # fmt: skip


def test_every_order_of_created_updated_deleted_ends_in_the_newest_state(thread_worker, web_url) -> None:
    # Stripe's period starts at the calendar month's start, so the free month after the deletion is the same
    # whichever events came first.
    month_start = now().replace(day=1, hour=0, minute=0, second=0)
    month_end = (month_start + timedelta(days=32)).replace(day=1)
    finals = []
    for order in itertools.permutations(range(3)):
        user = new_user()
        events = lifecycle(user, month_start, month_end, ts_now() - 100)
        seen = [deliver(web_url, events[index]) for index in order]
        newest_so_far = [max(order[: i + 1]) == index for i, index in enumerate(order)]
        assert seen == ["applied" if newest else "stale" for newest in newest_so_far], order
        row = subscription_of(user)
        assert row.stripe_state_event_id == events[2]["id"], order
        finals.append(
            (row.plan_type, row.monthly_minutes_limit, row.status, row.stripe_status, row.current_period_start,
             row.current_period_end)
        )  # fmt: skip
    assert finals == [("free", 60, "canceled", "canceled", month_start, month_end)] * 6


def test_same_second_events_are_resolved_through_stripes_api(thread_worker, web_url, stripe_api) -> None:
    user, customer, subscription_id = new_user(), new_id("cus"), new_id("sub")
    second = ts_now()
    bounds = {"start": now(), "end": now() + MONTH, "user_id": user}
    to_premium, to_enterprise = (
        subscription(subscription_id, customer, price_object=price(f"price_{plan}"), **bounds)
        for plan in ("premium", "enterprise")
    )
    stripe_api.subscriptions[subscription_id] = to_premium
    # Whichever of two events of one second is processed last, the result is what Stripe says now.
    assert deliver(web_url, stripe_event("customer.subscription.updated", to_premium, second)) == "applied"
    assert deliver(web_url, stripe_event("customer.subscription.updated", to_enterprise, second)) == "applied"
    assert subscription_of(user).plan_type == "premium"
    assert [r["path"] for r in stripe_api.requests] == [f"/v1/subscriptions/{subscription_id}"]


# -- dead letters and the sweep ------------------------------------------------------------------------------


def replay(letter_id: int) -> int:
    """`python -m worker dead-letters replay ID`, as an operator runs it."""
    return cli.main(["dead-letters", "replay", str(letter_id)])


def letter_of(event_id: str) -> sa.Row:
    (letter,) = query("SELECT * FROM dead_letters WHERE source = 'stripe' AND ref = :id", id=event_id)
    return letter


def test_an_unknown_customer_and_an_unknown_price_are_dead_lettered_then_replayed(
    thread_worker, web_url, capsys
) -> None:
    user, customer = new_user(), new_id("cus")
    payload = subscription(
        new_id("sub"), customer, price_object=price("price_unlisted"), start=now(), end=now() + MONTH
    )
    event = stripe_event("customer.subscription.created", payload, ts_now())
    assert deliver(web_url, event) == "dead_lettered"
    assert letter_of(event["id"]).reason.startswith(f"no user for Stripe customer {customer}")

    assert deliver(web_url, stripe_event("checkout.session.completed", checkout_session(customer, None, user), 1)) == (
        "applied"
    )
    assert replay(letter_of(event["id"]).id) == 1  # linked now, but the price is still unknown
    assert "failed again and stays: unknown Stripe price price_unlisted" in capsys.readouterr().out
    with environment(STRIPE_PRICE_PLANS="price_unlisted=enterprise"):
        assert replay(letter_of(event["id"]).id) == 0
    assert (subscription_of(user).plan_type, outcomes(event["id"])) == ("enterprise", {event["id"]: "applied"})


def test_an_event_whose_message_was_lost_is_applied_after_the_sweep(thread_worker) -> None:
    user = new_user()
    event = stripe_event("checkout.session.completed", checkout_session("cus_lost", None, user), ts_now())
    with db.transaction() as conn:  # stored by the receiver, but its message vanished with Redis
        webhook.store(conn, event, datetime.now(UTC) - timedelta(minutes=10))
    time.sleep(0.3)
    assert outcomes(event["id"]) == {}
    with db.transaction() as conn:
        result = inbox.sweep(conn, datetime.now(UTC))
    webhook.enqueue(result.requeue)
    assert result.requeue == [event["id"]]
    wait_until(lambda: outcomes(event["id"]), "the swept event processed")
    assert subscription_of(user).stripe_customer_id == "cus_lost"


def test_the_task_called_directly_just_works() -> None:
    user = new_user()
    event = stripe_event("checkout.session.completed", checkout_session("cus_direct", None, user), ts_now())
    with db.transaction() as conn:
        webhook.store(conn, event, datetime.now(UTC))
    process_event(event["id"])
    process_event(event["id"])  # a second delivery of the message changes nothing
    assert outcomes(event["id"]) == {event["id"]: "applied"}
    assert subscription_of(user).stripe_customer_id == "cus_direct"
    process_event(["not", "an", "id"])
    (letter,) = query("SELECT reason FROM dead_letters WHERE source = 'stripe'")
    assert letter.reason.startswith("event_id must be the id of a stored Stripe event")
