"""Reading Stripe payloads of every API shape (no database): periods, invoice lines and prorations,
plans through prices and through pre-price plans, and what a subscription costs a month."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import stripe
from support.stripe import (
    API_BASIL,
    API_BEFORE_PRICES,
    PERIOD_END,
    PERIOD_START,
    SHAPES,
    invoice,
    invoice_line,
    legacy_plan,
    price,
    proration_invoice,
    subscription,
)

import worker.stripe
from worker.dead_letters import Rejected
from worker.stripe import payloads

AT = PERIOD_START + timedelta(days=9)  # a plan change mid-period


@pytest.mark.parametrize("api_version", SHAPES)
def test_an_invoice_of_proration_lines_only_bills_no_period(api_version) -> None:
    upgrade = proration_invoice("sub_1", "cus_1", api_version, AT, PERIOD_END, "price_standard", "price_premium")
    assert all(payloads.is_proration(line) for line in upgrade["lines"]["data"])
    assert payloads.invoice_period(upgrade) is None
    assert payloads.billing_reason(upgrade) == "subscription_update"
    assert payloads.invoice_subscription(upgrade) == "sub_1"


@pytest.mark.parametrize("api_version", SHAPES)
def test_the_period_an_invoice_bills_is_its_first_line_that_is_not_a_proration(api_version) -> None:
    next_end = PERIOD_END + timedelta(days=30)
    cycle = invoice("sub_1", "cus_1", api_version, PERIOD_END, next_end, proration_first=True)
    assert payloads.invoice_period(cycle) == (PERIOD_END, next_end)


def test_invoice_item_lines_bill_no_period() -> None:
    one_off = invoice_line("sub_1", PERIOD_START, PERIOD_END, API_BASIL, proration=False)
    details = one_off["parent"].pop("subscription_item_details")
    one_off["parent"].update(type="invoice_item_details", invoice_item_details={**details, "invoice_item": "ii_1"})
    assert payloads.invoice_period(invoice("sub_1", "cus_1", lines=[one_off])) is None
    before_basil = {**invoice_line("sub_1", PERIOD_START, PERIOD_END, "2024-06-20", False), "type": "invoiceitem"}
    assert payloads.invoice_period(invoice("sub_1", "cus_1", lines=[before_basil])) is None


def test_an_invoice_without_lines_is_rejected() -> None:
    with pytest.raises(Rejected, match="has no line with a period"):
        payloads.invoice_period(invoice("sub_1", "cus_1", lines=[]))


def test_a_pre_price_item_is_read_through_its_plan() -> None:
    payload = subscription(
        "sub_1", "cus_1", API_BEFORE_PRICES, plan_object=legacy_plan("gold_monthly", 3000, plan="premium")
    )
    assert "price" not in payload["items"]["data"][0]
    state = payloads.read_subscription(payload)
    assert (state.plan.plan, state.plan.monthly_minutes, state.plan.price_id) == ("premium", 3000, "gold_monthly")
    assert (state.plan.price_cents, state.plan.currency, state.plan.monthly_amount_cents) == (3000, "USD", 3000)
    assert state.period == (PERIOD_START, PERIOD_END)  # on the subscription in that version


def test_a_pre_price_plan_follows_stripe_price_plans_and_its_metadata_minutes() -> None:
    item = {"object": "subscription_item", "plan": legacy_plan("price_standard", monthly_minutes="1200"), "quantity": 1}
    assert (payloads.item_plan(item, "sub_1").plan, payloads.item_plan(item, "sub_1").monthly_minutes) == (
        "standard",
        1200,
    )
    with pytest.raises(Rejected, match="unknown Stripe plan silver"):
        payloads.item_plan({"plan": legacy_plan("silver")}, "sub_1")
    with pytest.raises(Rejected, match="has no price on its first item"):
        payloads.item_plan({"quantity": 1}, "sub_1")


def test_a_subscription_from_before_items_is_its_own_item() -> None:
    payload = subscription("sub_1", "cus_1", API_BEFORE_PRICES, plan_object=legacy_plan("price_premium"))
    del payload["items"]
    assert payloads.read_subscription(payload).plan.plan == "premium"


@pytest.mark.parametrize(
    ("item_price", "quantity", "monthly"),
    [
        (price("price_standard", 1500), 1, 1500),
        (price("price_standard", 1500), 2, 3000),
        (price("price_premium", 12000, interval="year"), 1, 1000),
        (price("price_premium", 700, interval="week"), 1, 3033),
        ({**price("price_premium"), "unit_amount": None}, 1, None),  # tiered: no unit amount to compare
    ],
)
def test_what_a_subscription_pays_a_month(item_price, quantity, monthly) -> None:
    item = {"price": item_price, "quantity": quantity}
    assert payloads.item_plan(item, "sub_1").monthly_amount_cents == monthly


def test_an_ended_subscription_needs_no_plan_or_period() -> None:
    ended = subscription("sub_1", "cus_1", status="canceled", price_object=price("price_unlisted"))
    del ended["items"]["data"][0]["current_period_start"]
    state = payloads.read_subscription(ended)
    assert (state.status in payloads.STANDING, state.plan, state.period) == (False, None, None)


def test_the_package_does_not_shadow_the_stripe_library() -> None:
    for module in pkgutil.iter_modules(worker.stripe.__path__, "worker.stripe."):
        loaded = importlib.import_module(module.name)
        if hasattr(loaded, "stripe"):
            assert loaded.stripe is stripe, module.name
    assert stripe.__name__ == "stripe" and hasattr(stripe, "StripeClient")
    assert sys.modules["stripe"] is stripe


def test_the_package_imports_no_operator_command() -> None:
    for path in Path(worker.stripe.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {
            f"{node.module}.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "worker.rebuild" not in imported, path.name
