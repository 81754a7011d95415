"""The Stripe API client against the local stand-in: one retry policy (429 after its Retry-After, 5xx and
timeouts with backoff, never stripe-python's own on top), refusals, the event log's pages."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from support.stripe import FakeStripe, new_id, stripe_event, stripe_stand_in, subscription

from worker.dead_letters import Rejected
from worker.stripe import api

SUBSCRIPTION = "sub_api_1"
PATH = f"/v1/subscriptions/{SUBSCRIPTION}"


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with stripe_stand_in() as fake:
        fake.subscriptions[SUBSCRIPTION] = subscription(SUBSCRIPTION, "cus_api")
        yield fake


def test_a_subscription_as_stripe_has_it_now(fake_stripe) -> None:
    answer = api.retrieve_subscription(SUBSCRIPTION)
    assert answer.payload == fake_stripe.subscriptions[SUBSCRIPTION]
    assert answer.as_of is not None  # Stripe's clock, from the answer's Date header
    (call,) = fake_stripe.calls
    assert call["stripe_version"] >= "2025-03-31"  # the pinned version answers in basil's shape, as built
    assert fake_stripe.requests == [{"path": PATH, "authorization": "Bearer sk_test_fake"}]


def test_a_rate_limit_is_retried_after_its_retry_after(fake_stripe) -> None:
    fake_stripe.fail(PATH, 429, times=2, retry_after="3")
    assert api.retrieve_subscription(SUBSCRIPTION).payload["id"] == SUBSCRIPTION
    assert fake_stripe.waits == [3.0, 3.0]
    assert len(fake_stripe.requests) == 3


def test_a_retry_after_beyond_the_limit_is_cut_to_it(fake_stripe) -> None:
    fake_stripe.fail(PATH, 429, retry_after="3600")
    api.retrieve_subscription(SUBSCRIPTION)
    assert fake_stripe.waits == [api.RETRY.max_retry_after]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried_with_growing_backoff(fake_stripe, status) -> None:
    fake_stripe.fail(PATH, status, times=3)
    api.retrieve_subscription(SUBSCRIPTION)
    assert len(fake_stripe.waits) == 3
    for attempt, wait in enumerate(fake_stripe.waits, start=1):
        ceiling = min(api.RETRY.max_delay, api.RETRY.first_delay * 2 ** (attempt - 1))
        assert ceiling / 2 <= wait <= ceiling  # exponential, with jitter


def test_a_timeout_is_retried(fake_stripe, monkeypatch) -> None:
    monkeypatch.setattr(api, "RETRY", dataclasses.replace(api.RETRY, timeout=(2.0, 0.3)))
    fake_stripe.fail(PATH, status=0)  # the first request gets no answer
    assert api.retrieve_subscription(SUBSCRIPTION).payload["id"] == SUBSCRIPTION
    assert len(fake_stripe.requests) == 2 and len(fake_stripe.waits) == 1


def test_stripe_down_past_every_try_is_unavailable_and_tried_once_per_attempt(fake_stripe) -> None:
    fake_stripe.fail_status = 500
    with pytest.raises(api.StripeUnavailable, match=f"after {api.RETRY.attempts} tries") as raised:
        api.retrieve_subscription(SUBSCRIPTION)
    assert isinstance(raised.value, ConnectionError)  # transient for the tasks' retry
    assert len(fake_stripe.requests) == api.RETRY.attempts  # stripe-python adds no retries of its own


def test_a_refusal_is_rejected_at_once(fake_stripe) -> None:
    with pytest.raises(Rejected, match=r"Stripe API refused subscription sub_unknown \(HTTP 404\)"):
        api.retrieve_subscription("sub_unknown")
    assert len(fake_stripe.requests) == 1 and fake_stripe.waits == []


def test_the_event_log_is_read_page_by_page(fake_stripe) -> None:
    fake_stripe.events = [
        stripe_event(type_, {"object": "subscription", "id": new_id("sub")}, 1_900_000_000 + n)
        for n, type_ in enumerate(["customer.subscription.created", "customer.created"] * 3)
    ]
    fake_stripe.page_size = 2
    types = ["customer.subscription.created", "invoice.paid"]
    first = api.list_events(types, 1_900_000_000, None)
    assert [event["created"] for event in first.events] == [1_900_000_004, 1_900_000_002]  # newest first
    assert first.has_more
    second = api.list_events(types, 1_900_000_000, first.events[-1]["id"])
    assert ([event["created"] for event in second.events], second.has_more) == ([1_900_000_000], False)
    assert api.list_events(types, 1_900_000_001, first.events[-1]["id"]).events == []  # created[gte]
    query = fake_stripe.event_pages()[0]
    assert (query["limit"], query["created[gte]"], query["types[0]"], query["types[1]"]) == (
        "100",
        "1900000000",
        *types,
    )
    assert fake_stripe.event_pages()[1]["starting_after"] == first.events[-1]["id"]
