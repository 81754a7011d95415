"""Stripe's API, read with STRIPE_API_KEY at STRIPE_API_BASE: a subscription as Stripe has it now, and
pages of the event log.

One retry policy, here: a rate limit (429, after its Retry-After when Stripe sends one), a server error
(5xx) or a timeout / lost connection is tried again with exponential backoff and jitter, up to
RETRY.attempts tries; then StripeUnavailable (a ConnectionError: transient for the callers' retries).
stripe-python's own retries are off (max_network_retries=0): it would retry 5xx and connection errors
but not 429, and ignore Retry-After, and the two loops would multiply. Any other refusal (a bad key, an
unknown id) is Refused (Rejected) with Stripe's message. Every request is bounded by RETRY.timeout.

Objects come back in the API version stripe-python pins (its Stripe-Version header), today's shape;
events keep the version they were created in (their `api_version`), whatever the request's.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import stripe

from worker.config import settings
from worker.dead_letters import Rejected
from worker.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries of one request, the first included
    first_delay: float = 0.5  # seconds before the second try; doubled each time
    max_delay: float = 8.0  # seconds
    max_retry_after: float = 60.0  # seconds: a longer Retry-After is cut to this
    timeout: tuple[float, float] = (5.0, 20.0)  # seconds to connect, and to wait for the answer


RETRY = RetryPolicy()
sleep: Callable[[float], None] = time.sleep  # tests record the waits instead


class StripeUnavailable(ConnectionError):
    """Stripe's API did not answer usefully after every try: worth trying again later."""


class Refused(Rejected):
    """Stripe's API refused the request (a bad key, an unknown id): asking again changes nothing."""

    def __init__(self, reason: str, http_status: int | None) -> None:
        super().__init__(reason)
        self.http_status = http_status


def _client() -> stripe.StripeClient:
    config = settings()
    return stripe.StripeClient(
        config.stripe_api_key,
        base_addresses={"api": config.stripe_api_base},
        max_network_retries=0,  # this module retries (see above)
        http_client=stripe.RequestsClient(timeout=RETRY.timeout),
    )


def _retry_after(exc: stripe.StripeError) -> float | None:
    """The seconds a 429's Retry-After header asks for, when it has one."""
    headers = {str(key).lower(): value for key, value in (exc.headers or {}).items()}
    try:
        return max(0.0, float(headers["retry-after"]))
    except (KeyError, TypeError, ValueError):
        return None


def _delay(attempt: int, exc: stripe.StripeError) -> float:
    """Seconds to wait after failed try number `attempt`."""
    asked = _retry_after(exc) if isinstance(exc, stripe.RateLimitError) else None
    if asked is not None:
        return min(asked, RETRY.max_retry_after)
    return random.uniform(0.5, 1.0) * min(RETRY.max_delay, RETRY.first_delay * 2 ** (attempt - 1))


def _call(what: str, request: Callable[[stripe.StripeClient], T]) -> T:
    client = _client()
    attempt = 1
    while True:
        try:
            return request(client)
        except (stripe.RateLimitError, stripe.APIError, stripe.APIConnectionError) as exc:
            if attempt >= RETRY.attempts:
                raise StripeUnavailable(
                    f"Stripe API unavailable fetching {what} after {attempt} tries: {exc.user_message or exc}"
                ) from exc
            delay = _delay(attempt, exc)
            log.warning("stripe_api_retry", what=what, attempt=attempt, status=exc.http_status, wait_s=round(delay, 3))
            sleep(delay)
            attempt += 1
        except stripe.StripeError as exc:
            reason = f"Stripe API refused {what} (HTTP {exc.http_status}): {exc.user_message or exc}"
            raise Refused(reason, exc.http_status) from exc


@dataclass(frozen=True)
class Answer:
    payload: dict
    as_of: datetime | None  # Stripe's clock when it answered (the Date header), when known


def _answer(obj: stripe.StripeObject) -> Answer:
    """The JSON Stripe sent, as it sent it (stripe-python's objects turn some fields into Decimals), and when."""
    response = obj.last_response
    assert response is not None, "an object fetched from the API has the response it came in"
    date = response.headers.get("Date")
    try:
        as_of = parsedate_to_datetime(date) if date else None
    except (TypeError, ValueError):
        as_of = None
    return Answer(json.loads(response.body), as_of)


def retrieve_subscription(subscription_id: str) -> Answer:
    """GET /v1/subscriptions/{id}: the subscription as Stripe has it now."""
    return _answer(_call(f"subscription {subscription_id}", lambda c: c.v1.subscriptions.retrieve(subscription_id)))


@dataclass(frozen=True)
class EventPage:
    events: list[dict]  # newest first, as Stripe lists them
    has_more: bool


def list_events(types: Sequence[str], created_gte: int, starting_after: str | None, limit: int = 100) -> EventPage:
    """GET /v1/events: one page of the events of these types created at or after `created_gte` (Unix
    seconds), older than `starting_after` when given."""
    params: dict[str, Any] = {"types": list(types), "created": {"gte": created_gte}, "limit": limit}
    if starting_after is not None:
        params["starting_after"] = starting_after
    listed = _answer(
        _call(f"events after {starting_after or 'the newest'}", lambda c: c.v1.events.list(params))  # type: ignore[arg-type]
    ).payload
    return EventPage(
        [event for event in listed.get("data", []) if isinstance(event, dict)], listed.get("has_more") is True
    )
