"""Metering against the real database: exact hourly rows, exact period totals, limits, dead letters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.checks import reference, tracking_rows
from support.factories import NOW, event, insert_user

from worker.metering import pipeline


def period_totals(connection: sa.Connection, user: uuid.UUID) -> dict[datetime, int]:
    rows = connection.execute(
        sa.text("SELECT period_start, used_ms FROM usage_periods WHERE user_id = :u AND used_ms > 0"), {"u": user}
    )
    return {row.period_start: row.used_ms for row in rows}


# -- an independent reference, computed from the events alone ------------------------------------------


CONVERSATIONS = [str(uuid.UUID(int=n)) for n in range(1, 4)]
event_strategy = st.fixed_dictionaries(
    {
        "offset_ms": st.integers(min_value=-34 * 86_400_000, max_value=250_000),
        "seconds": st.one_of(
            st.integers(min_value=1, max_value=14400),
            st.decimals(min_value=Decimal("0.001"), max_value=Decimal("7200"), places=3).map(float),
        ),
        "language": st.sampled_from(["en", "zh", "pt-BR"]),
        "conversation": st.sampled_from([None, *CONVERSATIONS]),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(event_strategy, min_size=1, max_size=40),
    duplicate_indexes=st.lists(st.integers(min_value=0, max_value=39), max_size=10),
    timezone=st.sampled_from(["UTC", "Asia/Kolkata", "America/New_York", "Australia/Adelaide"]),
    batch_sizes=st.lists(st.integers(min_value=1, max_value=15), min_size=1, max_size=8),
    order=st.randoms(use_true_random=False),
)
def test_totals_equal_an_independent_reference(
    connection: sa.Connection, specs, duplicate_indexes, timezone, batch_sizes, order
) -> None:
    with connection.begin_nested() as savepoint:
        user = insert_user(connection, timezone=timezone)
        events = [
            event(
                user,
                f"e{i}",
                NOW + timedelta(milliseconds=spec["offset_ms"]),
                spec["seconds"],
                language=spec["language"],
                **({"conversation_id": spec["conversation"]} if spec["conversation"] else {}),
            )
            for i, spec in enumerate(specs)
        ]
        stream = events + [events[i] for i in duplicate_indexes if i < len(events)]
        order.shuffle(stream)
        position, sizes = 0, iter(batch_sizes * 50)
        while position < len(stream):
            size = next(sizes)
            outcome = pipeline.apply_events(connection, stream[position : position + size], NOW)
            assert not outcome.rejected
            position += size

        hours, months = reference(events, timezone)
        rows = tracking_rows(connection, user)
        assert set(rows) == set(hours)
        for key, expected in hours.items():
            row = rows[key]
            assert row["microphone_ms"] == expected["ms"], key
            assert row["microphone_seconds"] == expected["ms"] // 1000
            assert row["message_count"] == expected["messages"]
            assert row["conversation_count"] == len(expected["conversations"])
            assert {k: Decimal(str(v)) for k, v in row["language_breakdown"].items()} == {
                k: Decimal(ms) / 1000 for k, ms in expected["languages"].items()
            }
        assert period_totals(connection, user) == {start: ms for start, ms in months.items() if ms}
        savepoint.rollback()


def test_120_half_second_events_make_exactly_60_seconds(connection: sa.Connection) -> None:
    user = insert_user(connection)
    start = NOW - timedelta(minutes=10)
    events = [event(user, f"half-{i}", start + timedelta(seconds=i), 0.5) for i in range(120)]
    outcome = pipeline.apply_events(connection, events, NOW)
    assert len(outcome.accepted) == 120
    assert sum(row["microphone_ms"] for row in tracking_rows(connection, user).values()) == 60_000
    assert outcome.quotas[str(user)].used_seconds == 60


def test_duplicates_change_nothing(connection: sa.Connection) -> None:
    user = insert_user(connection)
    item = event(user, "dup", NOW - timedelta(minutes=5), 30, conversation_id=CONVERSATIONS[0], feature="conversation")
    first = pipeline.apply_events(connection, [item, item], NOW)
    again = pipeline.apply_events(connection, [item], NOW + timedelta(seconds=1))
    assert (first.accepted, first.duplicates, again.accepted, again.duplicates) == (["dup"], ["dup"], [], ["dup"])
    (row,) = tracking_rows(connection, user).values()
    assert (row["microphone_ms"], row["message_count"], row["conversation_count"]) == (30_000, 1, 1)
    assert row["feature_usage"] == {"conversation": 1}


def test_an_event_across_new_year_is_split_between_years_and_periods(connection: sa.Connection) -> None:
    user = insert_user(connection)
    outcome = pipeline.apply_events(
        connection, [event(user, "ny", datetime(2026, 12, 31, 23, 50, tzinfo=UTC), 1200)], NOW
    )
    assert outcome.accepted == ["ny"]
    rows = tracking_rows(connection, user)
    assert rows[datetime(2026, 12, 31).date(), 23]["microphone_ms"] == 600_000
    assert rows[datetime(2027, 1, 1).date(), 0]["microphone_ms"] == 600_000
    assert period_totals(connection, user) == {
        datetime(2026, 12, 1, tzinfo=UTC): 600_000,
        datetime(2027, 1, 1, tzinfo=UTC): 600_000,
    }


def test_29_february_is_its_own_day(connection: sa.Connection) -> None:
    user = insert_user(connection)
    leap_now = datetime(2028, 3, 1, 0, 10, tzinfo=UTC)
    pipeline.apply_events(connection, [event(user, "leap", datetime(2028, 2, 29, 23, 59, tzinfo=UTC), 120)], leap_now)
    rows = tracking_rows(connection, user)
    assert rows[datetime(2028, 2, 29).date(), 23]["microphone_ms"] == 60_000
    assert rows[datetime(2028, 3, 1).date(), 0]["microphone_ms"] == 60_000
    assert period_totals(connection, user) == {
        datetime(2028, 2, 1, tzinfo=UTC): 60_000,
        datetime(2028, 3, 1, tzinfo=UTC): 60_000,
    }


def test_half_hour_zone_splits_the_period_at_local_midnight(connection: sa.Connection) -> None:
    user = insert_user(connection, timezone="Asia/Kolkata")  # +05:30: the month ends at 18:30 UTC
    now = datetime(2027, 2, 1, 1, 0, tzinfo=UTC)
    pipeline.apply_events(connection, [event(user, "k", datetime(2027, 1, 31, 18, 0, tzinfo=UTC), 3600)], now)
    rows = tracking_rows(connection, user)
    assert rows[datetime(2027, 1, 31).date(), 18]["microphone_ms"] == 3_600_000
    assert period_totals(connection, user) == {
        datetime(2026, 12, 31, 18, 30, tzinfo=UTC): 1_800_000,
        datetime(2027, 1, 31, 18, 30, tzinfo=UTC): 1_800_000,
    }


def alerts(connection: sa.Connection, user: uuid.UUID) -> list[int]:
    return list(
        connection.scalars(
            sa.text("SELECT threshold_percent FROM usage_alerts WHERE user_id = :u ORDER BY 1"), {"u": user}
        )
    )


def test_limits_alert_once_record_overage_and_block(connection: sa.Connection) -> None:
    user = insert_user(connection)  # free: 60 minutes
    now = datetime(2027, 1, 20, 12, 0, tzinfo=UTC)
    start = now - timedelta(hours=20)
    pipeline.apply_events(connection, [event(user, "a", start, 47 * 60)], now)
    assert alerts(connection, user) == []
    pipeline.apply_events(connection, [event(user, "b", start + timedelta(hours=1), 60)], now)  # 48 min = 80 %
    assert alerts(connection, user) == [80]
    pipeline.apply_events(connection, [event(user, "c", start + timedelta(hours=2), 30)], now)
    assert alerts(connection, user) == [80]
    outcome = pipeline.apply_events(connection, [event(user, "d", start + timedelta(hours=3), 20 * 60)], now)
    assert alerts(connection, user) == [80, 100]
    answer = outcome.quotas[str(user)]
    assert answer.used_seconds == 47 * 60 + 60 + 30 + 20 * 60  # recorded in full
    assert (answer.blocked, answer.remaining_seconds, answer.limit_seconds) == (True, 0, 3600)
    overage, reached, minutes = connection.execute(
        sa.text(
            "SELECT u.overage_ms, s.limit_reached_at, s.monthly_minutes_used FROM usage_periods u"
            " JOIN subscriptions s ON s.user_id = u.user_id AND s.current_period_start = u.period_start"
            " WHERE u.user_id = :u"
        ),
        {"u": user},
    ).one()
    assert overage == (answer.used_seconds - 3600) * 1000
    assert reached == now
    assert minutes == int(answer.used_seconds // 60)
    pipeline.apply_events(connection, [event(user, "e", start + timedelta(hours=4), 60)], now)
    assert alerts(connection, user) == [80, 100]


def test_bad_events_are_dead_lettered_and_good_ones_around_them_applied(connection: sa.Connection) -> None:
    user = insert_user(connection)
    unknown = uuid.uuid4()
    batch = [
        event(user, "good-1", NOW - timedelta(minutes=3), 10),
        event(user, "bad-seconds", NOW - timedelta(minutes=3), -1),
        event(unknown, "bad-user", NOW - timedelta(minutes=3), 10),
        "not an event",
        event(user, "bad-\udc80", NOW - timedelta(minutes=3), 10),
        {**event(user, "bad-nul", NOW - timedelta(minutes=3), 10), "language": "en\x00"},
        event(user, "good-2", NOW - timedelta(minutes=2), 5),
    ]
    outcome = pipeline.apply_events(connection, batch, NOW, task_name="metering.record_usage_batch")
    assert outcome.accepted == ["good-1", "good-2"]
    assert [(r.index, r.event_id) for r in outcome.rejected] == [
        (1, "bad-seconds"), (2, "bad-user"), (3, None), (4, None), (5, "bad-nul"),
    ]  # fmt: skip
    letters = connection.execute(sa.text("SELECT ref, reason, payload FROM dead_letters ORDER BY id")).all()
    assert [letter.reason for letter in letters] == [r.reason for r in outcome.rejected]
    assert letters[1].reason == f"unknown user_id {unknown}"
    assert letters[2].payload == "not an event"
    assert letters[3].payload["event_id"] == "bad-\\udc80"  # what jsonb cannot hold is kept as an escape
    assert letters[4].payload["language"] == "en\\x00"
    assert sum(row["microphone_ms"] for row in tracking_rows(connection, user).values()) == 15_000
