"""Stripe for tests: payloads built as Stripe's API reference describes them for the API version they
claim, and a local HTTP server that answers like Stripe's API.

Shapes. Before 2025-03-31 a subscription carries its period bounds and an invoice its `subscription`; an
invoice line has `type` (`subscription`, or `invoiceitem` for prorations) and `proration`. From
2025-03-31.basil on the bounds are on the subscription's items, the invoice's subscription at
`parent.subscription_details`, and a line says what made it in `parent` (`subscription_item_details`
with its `proration`) and its price in `pricing.price_details`. Before the Prices API an item (and an
invoice line) carries only its `plan` (amount, currency, interval; before 2018-02-05 a name of its own and
no product), as endpoints pinned to such versions may still receive.

The stand-in answers GET /v1/subscriptions/{id} and GET /v1/events (a list object: `object`, `url`,
`has_more`, `data`, newest first, `types[]`, `created[gte]`, `limit` up to 100, `starting_after`), with
Stripe's error bodies, and can be told to fail (429 with Retry-After, 5xx), to hang past the client's
timeout, or to hold its answers until a test lets them go (a slow Stripe).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa

from support.factories import insert_user
from support.run import environment
from worker.metering import pipeline
from worker.stripe import api, inbox, webhook

API_BEFORE_PRICES = "2017-08-15"  # items and lines carry their plan; plans have names, not products
API_BEFORE_BASIL = "2024-06-20"
API_BASIL = "2025-03-31.basil"
SHAPES = (API_BEFORE_BASIL, API_BASIL)

PERIOD_START = datetime(2027, 3, 5, 8, 0, tzinfo=UTC)  # Stripe's period: mid-month, not a calendar boundary
PERIOD_END = datetime(2027, 4, 5, 8, 0, tzinfo=UTC)
HELD_ANSWER_LIMIT = 30.0  # seconds a held answer waits at most, so a failing test cannot hang the run


def ts(moment: datetime) -> int:
    return int(moment.timestamp())


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:14]}"


def _basil(api_version: str) -> bool:
    return api_version >= "2025-03-31"


# -- payloads as Stripe sends them -------------------------------------------------------------------------


def stripe_event(
    type_: str, obj: dict, created: int, api_version: str = API_BASIL, event_id: str | None = None
) -> dict:
    return {
        "id": event_id or new_id("evt"),
        "object": "event",
        "api_version": api_version,
        "created": created,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": new_id("req"), "idempotency_key": None},
        "type": type_,
        "data": {"object": obj, "previous_attributes": {}} if type_.endswith(".updated") else {"object": obj},
    }


def price(price_id: str = "price_standard", unit_amount: int = 1500, interval: str = "month", **metadata: str) -> dict:
    return {
        "id": price_id,
        "object": "price",
        "active": True,
        "currency": "usd",
        "unit_amount": unit_amount,
        "recurring": {"interval": interval, "interval_count": 1, "usage_type": "licensed"},
        "metadata": metadata,
        "product": "prod_worldspeak",
        "type": "recurring",
    }


def legacy_plan(plan_id: str, amount: int = 1500, name: str = "WorldSpeak", **metadata: str) -> dict:
    """A plan as API versions before 2018-02-05 render it: a name of its own, no product, no nickname."""
    return {
        "id": plan_id,
        "object": "plan",
        "amount": amount,
        "created": ts(datetime(2017, 1, 10, tzinfo=UTC)),
        "currency": "usd",
        "interval": "month",
        "interval_count": 1,
        "livemode": False,
        "metadata": metadata,
        "name": name,
        "statement_descriptor": None,
        "trial_period_days": None,
    }


def subscription(
    subscription_id: str,
    customer: str,
    api_version: str = API_BASIL,
    status: str = "active",
    price_object: dict | None = None,
    start: datetime = PERIOD_START,
    end: datetime = PERIOD_END,
    user_id: uuid.UUID | None = None,
    plan_object: dict | None = None,
    created: int | None = None,
    **fields: Any,
) -> dict:
    """A subscription with one item: priced (`price_object`), or before prices with `plan_object` only.
    `created` defaults to the period's start."""
    item: dict[str, Any] = {
        "id": f"si_{subscription_id[4:]}",
        "object": "subscription_item",
        "quantity": 1,
        "subscription": subscription_id,
    }
    if plan_object is not None:
        item["plan"] = plan_object
    else:
        item["price"] = price_object or price()
    payload = {
        "id": subscription_id,
        "object": "subscription",
        "created": created if created is not None else ts(start),
        "customer": customer,
        "status": status,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "ended_at": None,
        "trial_end": None,
        "metadata": {"user_id": str(user_id)} if user_id else {},
        "items": {
            "object": "list",
            "data": [item],
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={subscription_id}",
        },
        **fields,
    }
    if plan_object is not None:  # single-plan subscriptions of those versions show it on themselves too
        payload.update(plan=plan_object, quantity=1)
    bounds = {"current_period_start": ts(start), "current_period_end": ts(end)}
    (item if _basil(api_version) else payload).update(bounds)
    return payload


def invoice_line(
    subscription_id: str,
    start: datetime,
    end: datetime,
    api_version: str,
    proration: bool,
    amount: int = 1500,
    price_id: str = "price_standard",
) -> dict:
    """A line billing the subscription's item for [start, end): its period, or, as a proration, the part of
    the period after a change (a credit when `amount` is negative)."""
    invoice_item = new_id("ii") if proration else None
    line = {
        "id": new_id("il"),
        "object": "line_item",
        "amount": amount,
        "currency": "usd",
        "description": f"{'Remaining' if amount >= 0 else 'Unused'} time on {price_id}" if proration else None,
        "period": {"start": ts(start), "end": ts(end)},
        "quantity": 1,
    }
    item_id = f"si_{subscription_id[4:]}"
    if _basil(api_version):
        details = {
            "invoice_item": invoice_item,
            "proration": proration,
            "proration_details": {"credited_items": None},
            "subscription": subscription_id,
            "subscription_item": item_id,
        }
        line["parent"] = {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": details,
        }
        line["pricing"] = {
            "type": "price_details",
            "price_details": {"price": price_id, "product": "prod_worldspeak"},
            "unit_amount_decimal": str(amount),
        }
    else:  # a proration is an invoice item of the subscription
        line.update(
            type="invoiceitem" if proration else "subscription",
            proration=proration,
            invoice_item=invoice_item,
            subscription=subscription_id,
            subscription_item=item_id,
        )
        if api_version <= API_BEFORE_PRICES:
            line["plan"] = legacy_plan(price_id, abs(amount))
        else:
            line["price"] = price(price_id, abs(amount))
    return line


def invoice(
    subscription_id: str | None,
    customer: str,
    api_version: str = API_BASIL,
    start: datetime = PERIOD_START,
    end: datetime = PERIOD_END,
    proration_first: bool = False,
    billing_reason: str = "subscription_cycle",
    lines: list[dict] | None = None,
) -> dict:
    """An invoice of the period [start, end) (a proration line before its period line with
    `proration_first`), or of the given `lines`."""
    if lines is None:
        lines = [invoice_line(subscription_id or "", start, end, api_version, proration=False)]
        if proration_first:
            lines.insert(0, invoice_line(subscription_id or "", start + timedelta(days=9), end, api_version, True))
    invoice_id = new_id("in")
    payload = {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer,
        "billing_reason": billing_reason,
        "status": "paid",
        "period_start": ts(start - timedelta(days=31)),  # Stripe: the previous period, for subscription invoices
        "period_end": ts(start),
        "lines": {
            "object": "list",
            "data": lines,
            "has_more": False,
            "total_count": len(lines),
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
    }
    if subscription_id is not None:
        if _basil(api_version):
            details = {"subscription": subscription_id, "metadata": {}}
            payload["parent"] = {"type": "subscription_details", "quote_details": None, "subscription_details": details}
        else:
            payload["subscription"] = subscription_id
    return payload


def proration_invoice(
    subscription_id: str, customer: str, api_version: str, at: datetime, end: datetime, old: str, new: str, amounts=()
) -> dict:
    """What Stripe invoices at once when a subscription changes price mid-period (proration_behavior
    always_invoice): a credit for the unused time on the old price and a charge for the rest of the period
    on the new one, both proration lines for [at, end), billing_reason subscription_update."""
    credit, charge = amounts or (-1000, 2000)
    lines = [
        invoice_line(subscription_id, at, end, api_version, True, amount=credit, price_id=old),
        invoice_line(subscription_id, at, end, api_version, True, amount=charge, price_id=new),
    ]
    return invoice(subscription_id, customer, api_version, at, end, billing_reason="subscription_update", lines=lines)


def checkout_session(customer: str | None, subscription_id: str | None, user_id: Any, via: str = "reference") -> dict:
    return {
        "id": new_id("cs_test"),
        "object": "checkout.session",
        "mode": "subscription" if subscription_id else "payment",
        "status": "complete",
        "customer": customer,
        "subscription": subscription_id,
        "client_reference_id": str(user_id) if via == "reference" else None,
        "metadata": {"user_id": str(user_id)} if via == "metadata" else {},
    }


# -- events applied in a test's transaction ----------------------------------------------------------------

NOW = datetime(2027, 3, 10, 12, 0, tzinfo=UTC)  # the handler tests' clock: inside [PERIOD_START, PERIOD_END)


def deliver(connection: sa.Connection, event: dict, now: datetime = NOW) -> inbox.Processed:
    webhook.store(connection, event, now)
    return inbox.process(connection, event["id"], now)


def row(connection: sa.Connection, user: uuid.UUID) -> sa.Row:
    return connection.execute(sa.text("SELECT * FROM subscriptions WHERE user_id = :u"), {"u": user}).one()


def open_periods(connection: sa.Connection, user: uuid.UUID) -> list[sa.Row]:
    query = "SELECT * FROM usage_periods WHERE user_id = :u AND archived_at IS NULL ORDER BY period_start"
    return connection.execute(sa.text(query), {"u": user}).all()


def audit_actors(connection: sa.Connection, user: uuid.UUID) -> list[str]:
    query = "SELECT actor FROM audit_logs WHERE user_id = :u AND table_name = 'subscriptions'"
    return list(connection.scalars(sa.text(query), {"u": user}))


def linked_user(connection: sa.Connection, customer: str, **profile: Any) -> uuid.UUID:
    """A user whose Stripe customer was tied to them by a completed checkout."""
    user = insert_user(connection, **profile)
    session = checkout_session(customer, None, user)
    the_day_before = PERIOD_START - timedelta(days=1)
    done = deliver(connection, stripe_event("checkout.session.completed", session, ts(the_day_before)), the_day_before)
    assert done.outcome == "applied"
    return user


def subscribed_user(connection: sa.Connection, api_version: str = API_BASIL, **profile: Any) -> tuple:
    customer, subscription_id = new_id("cus"), new_id("sub")
    user = linked_user(connection, customer, **profile)
    created = stripe_event(
        "customer.subscription.created", subscription(subscription_id, customer, api_version), ts(PERIOD_START)
    )
    assert deliver(connection, created, PERIOD_START + timedelta(seconds=5)).outcome == "applied"
    return user, customer, subscription_id


def metered(connection: sa.Connection, user: uuid.UUID, started: datetime, seconds: int, now: datetime) -> None:
    usage = {"event_id": new_id("use"), "user_id": str(user), "started_at": started.isoformat(), "seconds": seconds,
             "language": "en"}  # fmt: skip
    assert pipeline.apply_events(connection, [usage], now).accepted


def period_usage(connection: sa.Connection, user: uuid.UUID) -> list[tuple]:
    query = "SELECT period_start, period_end, used_ms FROM usage_periods WHERE user_id = :u ORDER BY period_start"
    return [tuple(r) for r in connection.execute(sa.text(query), {"u": user})]


# -- a local server that answers like Stripe's API ---------------------------------------------------------


@dataclass
class Fault:
    """The next `times` requests whose path starts with `path` (and whose query has `query`) fail."""

    path: str
    status: int = 500  # 0: no answer until the client gives up (a timeout)
    times: int = 1
    retry_after: str | None = None
    query: dict[str, str] | None = None

    def matches(self, path: str, query: dict[str, str]) -> bool:
        return (
            self.times > 0
            and path.startswith(self.path)
            and all(query.get(key) == value for key, value in (self.query or {}).items())
        )


ERRORS = {
    404: "invalid_request_error",
    429: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
}


class FakeStripe:
    """Stripe's API for one account: its subscriptions as they are now (`subscriptions`) and its event
    log (`events`, in the order they happened). Requests are recorded (`requests`: path and
    authorization; `calls`: with the parsed query and the Stripe-Version header)."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, dict] = {}
        self.events: list[dict] = []
        self.requests: list[dict] = []
        self.calls: list[dict] = []
        self.fail_status: int | None = None
        self.faults: list[Fault] = []
        self.page_size = 100  # a page holds at most this many events, whatever the limit asked for
        self.hold: threading.Event | None = None  # when set, subscription answers wait for it
        self.holding = threading.Event()  # set once an answer waits for `hold`
        self.waits: list[float] = []  # the pauses the client's retries asked for (see stripe_stand_in)
        self._closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, path: str, status: int = 500, times: int = 1, **kwargs: Any) -> None:
        self.faults.append(Fault(path, status, times, **kwargs))

    def event_pages(self) -> list[dict]:
        """The queries of the /v1/events requests, in order."""
        return [call["query"] for call in self.calls if call["path"] == "/v1/events"]

    def _fault(self, path: str, query: dict[str, str]) -> Fault | None:
        for fault in self.faults:
            if fault.matches(path, query):
                fault.times -= 1
                return fault
        return None

    def newest_first(self) -> list[dict]:
        """The event log in the order Stripe lists it."""
        ordered = sorted(enumerate(self.events), key=lambda pair: (pair[1]["created"], pair[0]), reverse=True)
        return [event for _, event in ordered]

    def _events_page(self, query: dict[str, str]) -> tuple[int, dict]:
        types = {value for key, value in query.items() if re.fullmatch(r"types\[\d*\]", key)}
        limit = int(query.get("limit", "10"))
        if not 1 <= limit <= 100:
            return 400, _error("invalid_request_error", "This value must be between 1 and 100 (it currently is "
                                                        f"{limit}).", param="limit")  # fmt: skip
        gte = int(query["created[gte]"]) if "created[gte]" in query else None
        listed = [
            event
            for event in self.newest_first()
            if (not types or event["type"] in types) and (gte is None or event["created"] >= gte)
        ]
        first = 0
        if "starting_after" in query:
            ids = [event["id"] for event in listed]
            if query["starting_after"] not in ids:
                return 400, _error("invalid_request_error", f"No such event: '{query['starting_after']}'")
            first = ids.index(query["starting_after"]) + 1
        page = listed[first : first + min(limit, self.page_size)]
        return 200, {"object": "list", "url": "/v1/events", "has_more": first + len(page) < len(listed), "data": page}

    def _subscription(self, path: str) -> tuple[int, dict]:
        match = re.fullmatch(r"/v1/subscriptions/([A-Za-z0-9_]+)", path)
        found = self.subscriptions.get(match.group(1)) if match else None
        if self.hold is not None:
            self.holding.set()
            self.hold.wait(HELD_ANSWER_LIMIT)
        if found is None:
            message = f"No such subscription: '{match.group(1) if match else path}'"
            return 404, _error("invalid_request_error", message, code="resource_missing", param="id")
        return 200, found

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                split = urlsplit(self.path)
                query = {key: values[-1] for key, values in parse_qs(split.query).items()}
                fake.requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                fake.calls.append(
                    {"path": split.path, "query": query, "stripe_version": self.headers.get("Stripe-Version")}
                )
                fault = fake._fault(split.path, query)
                if fault is not None and fault.status == 0:
                    fake._closing.wait(HELD_ANSWER_LIMIT)  # the client's read timeout gives up first
                    return
                if fault is not None:
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    message = "Request rate limit exceeded." if fault.status == 429 else "Stripe is down"
                    code = "rate_limit" if fault.status == 429 else None
                    self._answer(fault.status, _error(ERRORS[fault.status], message, code=code), headers)
                elif fake.fail_status is not None:
                    self._answer(fake.fail_status, _error("api_error", "Stripe is down"))
                elif split.path == "/v1/events":
                    self._answer(*fake._events_page(query))
                else:
                    self._answer(*fake._subscription(split.path))

            def _answer(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)  # with a Date header, as Stripe's
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Request-Id", new_id("req"))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                    pass

            def log_message(self, *_args: Any) -> None:
                pass

        return Handler

    def close(self) -> None:
        self._closing.set()
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


def _error(type_: str, message: str, code: str | None = None, param: str | None = None) -> dict:
    error = {"type": type_, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return {"error": error}


@contextmanager
def stripe_stand_in() -> Iterator[FakeStripe]:
    """A FakeStripe that STRIPE_API_KEY and STRIPE_API_BASE point at, for one block. The client's retries
    record their pauses in `waits` instead of sleeping."""
    fake = FakeStripe()
    sleep, api.sleep = api.sleep, fake.waits.append
    try:
        with environment(STRIPE_API_KEY="sk_test_fake", STRIPE_API_BASE=fake.url):
            yield fake
    finally:
        api.sleep = sleep
        fake.close()
