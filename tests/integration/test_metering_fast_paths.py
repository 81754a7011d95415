"""The shortcuts the throughput work added answer exactly what the long ways answer."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
import sqlalchemy as sa
from support.checks import tracking_rows
from support.factories import NOW, event, insert_user

from worker import periods, quota
from worker.dead_letters import Rejected
from worker.metering import events, pipeline

JAN = datetime(2027, 1, 1, tzinfo=UTC)
FEB = datetime(2027, 2, 1, tzinfo=UTC)
MAR = datetime(2027, 3, 1, tzinfo=UTC)


def exact_ms(seconds: float) -> int:
    return int((Decimal(repr(seconds)) * 1000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def test_durations_round_as_the_exact_decimal_does_even_at_half_milliseconds() -> None:
    rng = random.Random(7)
    ties = [n / 1000 + 0.0005 for n in range(1, 20_000)]  # x.xxx5 s: the float product lands either side
    samples = (
        ties
        + [rng.uniform(0.001, 14_400) for _ in range(20_000)]
        + [round(rng.uniform(0, 99), 3) for _ in range(20_000)]
    )
    for seconds in samples:
        if exact_ms(seconds) == 0:
            continue
        assert events._duration_ms({"seconds": seconds}, 14_400) == exact_ms(seconds), seconds


def test_a_half_millisecond_alone_rounds_to_zero_and_is_rejected() -> None:
    with pytest.raises(Rejected, match=r"at least 0\.001"):
        events._duration_ms({"seconds": 0.0005}, 14_400)


def test_user_ids_are_stored_in_canonical_spelling_however_they_arrive(connection: sa.Connection) -> None:
    user = insert_user(connection)
    spelt = [str(user).upper(), "{" + str(user) + "}", str(user).replace("-", ""), str(user)]
    batch = [event(user, f"spelling-{i}", NOW - timedelta(minutes=5), 1) | {"user_id": s} for i, s in enumerate(spelt)]
    outcome = pipeline.apply_events(connection, batch, NOW)
    assert len(outcome.accepted) == 4 and not outcome.rejected
    assert sum(row["message_count"] for row in tracking_rows(connection, user).values()) == 4


def test_language_and_feature_maps_add_key_by_key_across_batches(connection: sa.Connection) -> None:
    user = insert_user(connection)
    hour = NOW - timedelta(minutes=20)
    pipeline.apply_events(connection, [event(user, "m1", hour, 1.5, language="en", feature="conversation")], NOW)
    later = [
        event(user, "m2", hour, 2.25, language="en"),
        event(user, "m3", hour, 0.001, language="pt-BR", feature="quiz"),
    ]
    pipeline.apply_events(connection, later, NOW)
    (row,) = tracking_rows(connection, user).values()
    assert row["language_breakdown"] == {"en": 3.75, "pt-BR": 0.001}
    assert row["feature_usage"] == {"conversation": 1, "quiz": 1}


def period(start: datetime, end: datetime, number: int = 1) -> periods.Period:
    return periods.Period(number, "u", start, end, 60_000)


def test_periods_cover_a_span_only_from_its_start_to_its_end_without_a_gap() -> None:
    first, last = events.to_ms(JAN + timedelta(days=20)), events.to_ms(FEB + timedelta(days=3))
    assert pipeline.covers([period(JAN, FEB), period(FEB, MAR, 2)], first, last)
    assert not pipeline.covers([period(JAN, FEB)], first, last)
    assert not pipeline.covers([period(FEB, MAR)], first, last)
    assert not pipeline.covers([period(JAN, FEB), period(FEB + timedelta(days=1), MAR, 2)], first, last)
    assert not pipeline.covers([], first, last)
    assert pipeline.covers([period(JAN, FEB)], events.to_ms(JAN), events.to_ms(FEB))  # [start, end) exactly


def test_a_user_whose_subscription_row_was_deleted_gets_a_free_one_with_the_next_event(
    connection: sa.Connection,
) -> None:
    user = insert_user(connection)
    pipeline.apply_events(connection, [event(user, "before", NOW - timedelta(minutes=5), 1)], NOW)
    connection.execute(sa.text("DELETE FROM subscriptions WHERE user_id = :u"), {"u": user})
    pipeline.apply_events(connection, [event(user, "after", NOW - timedelta(minutes=4), 1)], NOW)
    plan = connection.execute(sa.text("SELECT plan_type FROM subscriptions WHERE user_id = :u"), {"u": user})
    assert plan.scalar_one() == "free"


def test_the_quotas_made_from_the_updated_periods_are_what_quota_read_answers(connection: sa.Connection) -> None:
    utc, kolkata, late, first = (
        insert_user(connection, timezone=zone) for zone in ("UTC", "Asia/Kolkata", "UTC", "UTC")
    )
    for user in (utc, kolkata, late):  # metered before: subscription and periods exist
        pipeline.apply_events(connection, [event(user, f"before-{user}", NOW - timedelta(days=2), 30)], NOW)
    batch = [
        event(utc, "utc-now", NOW - timedelta(minutes=5), 90),
        event(utc, "utc-across-the-month", NOW - timedelta(minutes=40), 1200),  # December and January
        event(kolkata, "kolkata", NOW - timedelta(hours=3), 60),  # already January in Kolkata
        event(late, "late-december", NOW - timedelta(hours=2), 45),  # only the period before the current one
        event(first, "first-ever", NOW - timedelta(minutes=1), 10),  # no subscription until this batch
    ]
    outcome = pipeline.apply_events(connection, batch, NOW)
    assert len(outcome.accepted) == 5
    users = [str(user) for user in (utc, kolkata, late, first)]
    assert outcome.quotas == quota.read(connection, users, NOW)
    assert outcome.quotas[str(utc)].used_seconds == 90 + 600  # and the 10 of its 20 minutes that are in January


def test_the_subscription_follows_its_period_though_only_batches_that_move_a_minute_write_it(
    connection: sa.Connection,
) -> None:
    user = insert_user(connection)
    rng = random.Random(3)
    for number in range(90):  # past the free plan's 60 minutes, in steps of 0.5 to 170 s (most move no minute)
        seconds = rng.choice((0.5, 7.25, 20, 59.999, 61, 170))
        pipeline.apply_events(connection, [event(user, f"step-{number}", NOW - timedelta(minutes=25), seconds)], NOW)
        used_ms, minutes, reached = connection.execute(
            sa.text(
                "SELECT u.used_ms, s.monthly_minutes_used, s.limit_reached_at FROM subscriptions s"
                " JOIN usage_periods u ON u.user_id = s.user_id AND u.period_start = s.current_period_start"
                " WHERE s.user_id = :u"
            ),
            {"u": user},
        ).one()
        assert minutes == used_ms // 60_000
        assert (reached is not None) == (used_ms >= 60 * 60_000)
    assert reached is not None
