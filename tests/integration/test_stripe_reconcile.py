"""stripe.reconcile against the local stand-in for Stripe's API, committing to the session database:
webhooks that never arrived (a checkout, an upgrade, a cancellation, a failed payment) and a subscription
whose events are gone from Stripe's log are all restored, a second run finds nothing, a run stopped after
one page resumes, rate limits and server errors are waited out, and a dry run changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from support.factories import insert_user
from support.run import environment
from support.stripe import (
    API_BASIL,
    FakeStripe,
    checkout_session,
    deliver,
    invoice,
    new_id,
    price,
    proration_invoice,
    stripe_event,
    stripe_stand_in,
    subscription,
    ts,
)

from worker import cli, db, health
from worker.stripe import api, reconcile
from worker.tasks import stripe as stripe_tasks

pytestmark = pytest.mark.usefixtures("committed")

DAY = timedelta(days=1)
AMOUNTS = {"standard": 1500, "premium": 3000}


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with stripe_stand_in() as fake:
        yield fake


def wall_clock() -> datetime:
    """Reconciliation compares with Stripe's own clock (its Date header), so these tests live in real time."""
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class Account:
    """A Stripe account: what happened in it (every event in Stripe's log; the delivered ones also applied
    by the worker) and its subscriptions as they are now."""

    stripe: FakeStripe
    now: datetime
    users: dict[str, uuid.UUID] = field(default_factory=dict)
    subscriptions: dict[str, str] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)

    def learner(self, name: str) -> tuple[uuid.UUID, str, str]:
        with db.transaction() as conn:
            self.users[name] = insert_user(conn)
        self.subscriptions[name] = new_id("sub")
        return self.users[name], new_id("cus"), self.subscriptions[name]

    def happened(self, event: dict, *, delivered: bool) -> None:
        self.stripe.events.append(event)
        if delivered:
            with db.transaction() as conn:
                deliver(conn, event, self.now)
        else:
            self.missed.append(event["id"])

    def now_is(self, subscription_id: str, payload: dict) -> None:
        self.stripe.subscriptions[subscription_id] = payload


def state(customer: str, subscription_id: str, plan: str, start: datetime, end: datetime, **fields) -> dict:
    return subscription(subscription_id, customer, price_object=price(f"price_{plan}", AMOUNTS[plan]), start=start,
                        end=end, **fields)  # fmt: skip


def drifted(fake: FakeStripe) -> Account:
    """Five learners whose webhooks went missing."""
    now = wall_clock()
    account = Account(fake, now)
    start, end = now - 10 * DAY, now + 20 * DAY

    def subscribed(name: str, plan: str) -> tuple[str, str]:
        """A learner whose checkout and subscription, ten days ago, did arrive."""
        user, customer, sub = account.learner(name)
        checkout = checkout_session(customer, sub, user)
        account.happened(stripe_event("checkout.session.completed", checkout, ts(start)), delivered=True)
        created = state(customer, sub, plan, start, end)
        account.happened(stripe_event("customer.subscription.created", created, ts(start) + 1), delivered=True)
        return customer, sub

    # 1. A checkout none of whose events arrived: the learner paid and stays on the free plan.
    user, customer, sub = account.learner("checkout")
    bought_at = now - 3 * DAY
    bought = state(customer, sub, "standard", bought_at, bought_at + 30 * DAY)
    checkout = checkout_session(customer, sub, user)
    account.happened(stripe_event("checkout.session.completed", checkout, ts(bought_at)), delivered=False)
    account.happened(stripe_event("customer.subscription.created", bought, ts(bought_at) + 1), delivered=False)
    first = invoice(sub, customer, start=bought_at, end=bought_at + 30 * DAY, billing_reason="subscription_create")
    account.happened(stripe_event("invoice.paid", first, ts(bought_at) + 2), delivered=False)
    account.now_is(sub, bought)

    # 2. An upgrade that never arrived (the subscription event and the proration invoice).
    customer, sub = subscribed("upgrade", "standard")
    upgraded = state(customer, sub, "premium", start, end)
    account.happened(stripe_event("customer.subscription.updated", upgraded, ts(now - 2 * DAY)), delivered=False)
    prorations = proration_invoice(sub, customer, API_BASIL, now - 2 * DAY, end, "price_standard", "price_premium")
    account.happened(stripe_event("invoice.paid", prorations, ts(now - 2 * DAY) + 1), delivered=False)
    account.now_is(sub, upgraded)

    # 3. A cancellation that never arrived: the learner keeps premium.
    customer, sub = subscribed("cancellation", "premium")
    ended = state(customer, sub, "premium", start, end, status="canceled", canceled_at=ts(now - DAY))
    account.happened(stripe_event("customer.subscription.deleted", ended, ts(now - DAY)), delivered=False)
    account.now_is(sub, ended)

    # 4. A failed payment that never arrived.
    customer, sub = subscribed("failed payment", "standard")
    failed = invoice(sub, customer, start=start, end=end)
    account.happened(stripe_event("invoice.payment_failed", failed, ts(now - DAY)), delivered=False)
    overdue = state(customer, sub, "standard", start, end, status="past_due")
    account.happened(stripe_event("customer.subscription.updated", overdue, ts(now - DAY) + 1), delivered=False)
    account.now_is(sub, overdue)

    # 5. A yearly subscription bought 40 days ago: its checkout arrived, its own events did not, and Stripe
    #    keeps events for 30 days, so only the subscription itself tells.
    user, customer, sub = account.learner("beyond the event log")
    bought_at = now - 40 * DAY
    with db.transaction() as conn:
        checkout = stripe_event("checkout.session.completed", checkout_session(customer, sub, user), ts(bought_at))
        deliver(conn, checkout, now)
    yearly = price("price_premium", 30000, interval="year")
    account.now_is(sub, subscription(sub, customer, price_object=yearly, start=bought_at, end=bought_at + 365 * DAY))
    return account


RESTORED = {
    "checkout": ("standard", "active", "active"),
    "upgrade": ("premium", "active", "active"),
    "cancellation": ("free", "canceled", "canceled"),
    "failed payment": ("standard", "past_due", "past_due"),
    "beyond the event log": ("premium", "active", "active"),
}


def learners(account: Account) -> dict[str, tuple]:
    with db.engine().connect() as conn:
        rows = conn.execute(
            sa.text("SELECT user_id, plan_type, status, stripe_status FROM subscriptions WHERE user_id = ANY(:users)"),
            {"users": list(account.users.values())},
        ).all()
    by_user = {row.user_id: (row.plan_type, row.status, row.stripe_status) for row in rows}
    return {name: by_user.get(user) for name, user in account.users.items()}


def drift_counted(kind: str) -> float:
    body, _ = health.exposition()
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "worldspeak_stripe_drift_total" and sample.labels == {"kind": kind}
    )


def query(sql: str, **params) -> list[sa.Row]:
    with db.engine().connect() as conn:
        return conn.execute(sa.text(sql), params).all()


def test_a_run_restores_every_subscription_and_a_second_run_finds_nothing(fake_stripe) -> None:
    account = drifted(fake_stripe)
    assert learners(account) != RESTORED
    missing_before = drift_counted("missing_event")

    report = reconcile.run(None, wall_clock())

    assert learners(account) == RESTORED
    assert sorted(d.subject for d in report.differences if d.kind == "missing_event") == sorted(account.missed)
    assert report.drift() == {"missing_event": len(account.missed), "missing_state": 1}
    assert report.repaired == 1
    assert drift_counted("missing_event") == missing_before + len(account.missed)
    # The missed events went through the inbox like webhooks, and name themselves in the audit trail ...
    assert {
        row.outcome for row in query("SELECT outcome FROM stripe_events WHERE id = ANY(:ids)", ids=account.missed)
    } <= {
        "applied",
        "ignored",
    }
    (upgrade_actor,) = query(
        "SELECT actor FROM audit_logs WHERE user_id = :u AND new_values ->> 'plan_type' = 'premium'",
        u=account.users["upgrade"],
    )
    assert upgrade_actor.actor.startswith("stripe:evt_")
    # ... and the repair from the subscription itself names the run.
    (repair,) = query(
        "SELECT actor FROM audit_logs WHERE user_id = :u AND new_values ->> 'plan_type' = 'premium'",
        u=account.users["beyond the event log"],
    )
    assert repair.actor == f"reconcile:{report.run_id}"
    (run,) = query("SELECT * FROM stripe_reconcile_runs WHERE id = :id", id=report.run_id)
    assert (run.phase, run.finished_at is not None, run.drift) == ("done", True, report.drift())
    assert (
        query("SELECT last_error, last_succeeded_at FROM maintenance_runs WHERE job = 'stripe_reconcile'")[0][0] is None
    )

    again = reconcile.run(None, wall_clock())
    assert (again.drift(), again.repaired, again.resumed) == ({}, 0, False)
    assert again.run_id != report.run_id
    assert learners(account) == RESTORED


def test_a_run_stopped_after_one_page_resumes_where_it_stopped(fake_stripe) -> None:
    account = drifted(fake_stripe)
    fake_stripe.page_size = 2
    newest_first = fake_stripe.newest_first()
    after_first_page = newest_first[1]["id"]
    fake_stripe.fail("/v1/events", 500, times=api.RETRY.attempts, query={"starting_after": after_first_page})
    counted_before = drift_counted("missing_event")

    with pytest.raises(api.StripeUnavailable):
        reconcile.run(None, wall_clock())
    (stopped,) = query("SELECT * FROM stripe_reconcile_runs")
    assert (stopped.phase, stopped.event_cursor, stopped.pages, stopped.finished_at) == (
        "events",
        after_first_page,
        1,
        None,
    )
    assert stopped.last_error.startswith("StripeUnavailable")
    assert query("SELECT last_error FROM maintenance_runs WHERE job = 'stripe_reconcile'")[0][0].startswith(
        "StripeUnavailable"
    )
    stored = {row.id for row in query("SELECT id FROM stripe_events")}
    assert {event["id"] for event in newest_first[:2]} <= stored  # the first page's missing events are in

    pages_before = len(fake_stripe.event_pages())
    resumed = reconcile.run(None, wall_clock())
    assert (resumed.resumed, resumed.run_id) == (True, stopped.id)
    assert fake_stripe.event_pages()[pages_before]["starting_after"] == after_first_page  # not the first page again
    assert learners(account) == RESTORED
    assert query("SELECT phase FROM stripe_reconcile_runs")[0].phase == "done"
    (run,) = query("SELECT drift FROM stripe_reconcile_runs")
    assert run.drift == {"missing_event": len(account.missed), "missing_state": 1}  # each found once, in either part
    assert drift_counted("missing_event") == counted_before + len(account.missed)


def test_rate_limits_and_server_errors_on_some_pages_are_waited_out(fake_stripe) -> None:
    account = drifted(fake_stripe)
    fake_stripe.page_size = 3
    newest_first = fake_stripe.newest_first()
    fake_stripe.fail("/v1/events", 429, times=2, retry_after="2", query={"limit": "100"})  # the first page
    fake_stripe.fail("/v1/events", 503, times=2, query={"starting_after": newest_first[2]["id"]})
    fake_stripe.fail(f"/v1/subscriptions/{account.subscriptions['upgrade']}", 500)

    report = reconcile.run(None, wall_clock())

    assert learners(account) == RESTORED
    assert fake_stripe.waits[:2] == [2.0, 2.0]  # Retry-After honoured
    assert len(fake_stripe.waits) == 5
    assert report.pages == -(-len(fake_stripe.events) // 3)


def test_a_dry_run_prints_the_differences_and_changes_nothing(fake_stripe, capsys) -> None:
    account = drifted(fake_stripe)
    tables = ["subscriptions", "stripe_subscriptions", "stripe_events", "usage_periods", "audit_logs",
              "stripe_reconcile_runs", "maintenance_runs", "dead_letters"]  # fmt: skip
    before = {table: sorted(map(tuple, query(f"SELECT * FROM {table}"))) for table in tables}

    assert cli.main(["stripe-reconcile", "--dry-run"]) == 0

    assert {table: sorted(map(tuple, query(f"SELECT * FROM {table}"))) for table in tables} == before
    out = capsys.readouterr().out
    for event_id in account.missed:
        assert f"missing_event: {event_id}:" in out
    assert f"missing_state: {account.subscriptions['beyond the event log']}:" in out
    assert f"status: {account.subscriptions['cancellation']}: active -> canceled" in out
    # and what the missed events would fix: the upgrade's plan, the cancellation (status and when), the past due
    assert f"{len(account.missed) + 5} differences, nothing changed (dry run)" in out


def test_the_command_repairs_and_says_what_it_found(fake_stripe, capsys) -> None:
    account = drifted(fake_stripe)
    since = (wall_clock() - 5 * DAY).date().isoformat()
    assert cli.main(["stripe-reconcile", "--since", since]) == 0
    out = capsys.readouterr().out
    assert f"events since {since}T00:00:00+00:00" in out
    assert f"{len(account.missed) + 1} differences, 1 subscriptions repaired from Stripe" in out
    assert learners(account) == RESTORED


def test_a_second_run_at_once_skips_and_without_a_key_none_runs(fake_stripe) -> None:
    with db.engine().connect().execution_options(isolation_level="AUTOCOMMIT") as holder:
        holder.execute(sa.text("SELECT pg_advisory_lock(hashtext(:key))"), {"key": reconcile.LOCK_KEY})
        try:
            assert reconcile.run(None, wall_clock()).ran is False
        finally:
            holder.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": reconcile.LOCK_KEY})
    assert fake_stripe.requests == []
    with environment(STRIPE_API_KEY=""), pytest.raises(reconcile.ReconcileUnavailable, match="STRIPE_API_KEY"):
        reconcile.run(None, wall_clock())


def test_the_task_called_directly_reconciles_and_refuses_a_since_without_an_offset(fake_stripe) -> None:
    account = drifted(fake_stripe)
    since = (wall_clock() - 5 * DAY).isoformat()
    result = stripe_tasks.reconcile(since=since)
    assert (result["job"], result["ran"], result["since"], result["repaired"]) == ("stripe_reconcile", True, since, 1)
    assert result["drift"] == {"missing_event": len(account.missed), "missing_state": 1}
    assert learners(account) == RESTORED
    with pytest.raises(ValueError, match="since must be an ISO-8601 time with a UTC offset"):
        stripe_tasks.reconcile(since="2027-03-01T00:00:00")


def test_a_linked_subscription_stripe_does_not_know_is_reported_and_left_alone(fake_stripe) -> None:
    now = wall_clock()
    with db.transaction() as conn:
        user = insert_user(conn)
        checkout = checkout_session("cus_gone", "sub_gone", user)
        deliver(conn, stripe_event("checkout.session.completed", checkout, ts(now - DAY)), now)
    before = query("SELECT * FROM subscriptions WHERE user_id = :u", u=user)

    report = reconcile.run(None, now)

    assert report.drift() == {"not_found": 1}
    (difference,) = report.differences
    assert (
        difference.subject,
        difference.detail.startswith("Stripe API refused subscription sub_gone (HTTP 404)"),
    ) == (
        "sub_gone",
        True,
    )
    assert query("SELECT * FROM subscriptions WHERE user_id = :u", u=user) == before
