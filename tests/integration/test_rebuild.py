"""rebuild-usage: derived rows deliberately corrupted, then restored exactly from the ledger."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from support.factories import event, insert_user

from worker import rebuild
from worker.metering import pipeline

NOW = datetime(2027, 1, 15, 15, 0, tzinfo=UTC)
DAY = datetime(2027, 1, 15, tzinfo=UTC)
C1, C2, C3 = (str(uuid.UUID(int=n)) for n in range(1, 4))


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return DAY + timedelta(hours=hour, minutes=minute, seconds=second)


def execute(connection: sa.Connection, sql: str, **params: object) -> None:
    connection.execute(sa.text(sql), params)


def state(connection: sa.Connection) -> dict[str, list]:
    """Everything a rebuild derives, in comparable form."""
    queries = {
        "tracking": "SELECT user_id, date, hour, microphone_ms, microphone_seconds, message_count, conversation_count,"
        " language_breakdown, feature_usage, is_aggregated FROM usage_tracking ORDER BY 1, 2, 3",
        "conversations": "SELECT * FROM usage_hour_conversations ORDER BY 1, 2, 3",
        "periods": "SELECT user_id, period_start, period_end, used_ms, limit_ms FROM usage_periods ORDER BY 1, 2",
        "subscriptions": "SELECT user_id, monthly_minutes_used, limit_reached_at FROM subscriptions ORDER BY 1",
    }
    return {name: [tuple(row) for row in connection.execute(sa.text(sql))] for name, sql in queries.items()}


@pytest.fixture
def metered(connection: sa.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """Two users metered through the normal path, events crossing the range's edges and hours."""
    a, b = insert_user(connection), insert_user(connection, timezone="Asia/Kolkata")
    events = [
        event(a, "a-long", at(8, 30), 7200, conversation_id=C1),  # 08:30-10:30, starts before the range
        event(a, "a-cross", at(9, 50), 1200, conversation_id=C1, language="zh"),  # 09:50-10:10
        event(a, "a-in", at(10, 15), 90.5, conversation_id=C1, feature="pronunciation_check"),
        event(a, "a-c2", at(10, 40), 12, conversation_id=C2),
        event(a, "a-edge", at(11, 59, 30), 60, conversation_id=C2),  # 11:59:30-12:00:30
        event(a, "a-after", at(13, 30), 10),  # outside the range
        event(b, "b-in", at(10, 30), 30, language="pt-BR"),
    ]
    outcome = pipeline.apply_events(connection, events, NOW)
    assert not outcome.rejected
    return a, b


def test_hour_range_is_widened_to_whole_utc_hours() -> None:
    assert rebuild.hour_range(at(10), at(11)) == (at(10), at(11))
    assert rebuild.hour_range(at(10, 20), at(12, 0, 1)) == (at(10), at(13))
    assert rebuild.hour_range(datetime(2027, 1, 15, 23, 30, tzinfo=UTC), datetime(2027, 1, 16, 0, 30, tzinfo=UTC)) == (
        datetime(2027, 1, 15, 23, tzinfo=UTC), datetime(2027, 1, 16, 1, tzinfo=UTC),
    )  # fmt: skip


def test_corrupted_rows_are_restored_exactly_and_only_in_the_range(connection: sa.Connection, metered) -> None:
    a, b = metered
    good = state(connection)
    execute(connection, "UPDATE usage_tracking SET microphone_ms = microphone_ms + 5000, conversation_count = 7,"
            " language_breakdown = '{\"en\": \"x\"}' WHERE user_id = :a AND hour = 10", a=a)  # fmt: skip
    execute(connection, "DELETE FROM usage_tracking WHERE user_id = :a AND hour = 11", a=a)
    execute(connection, "UPDATE usage_tracking SET message_count = 0, feature_usage = NULL"
            " WHERE user_id = :a AND hour = 12", a=a)  # fmt: skip
    execute(connection, "UPDATE usage_tracking SET microphone_ms = 1 WHERE user_id = :a AND hour = 13", a=a)
    execute(connection, "DELETE FROM usage_hour_conversations WHERE user_id = :a AND hour_start = :h", a=a, h=at(10))
    execute(connection, "INSERT INTO usage_hour_conversations VALUES (:a, :h, :c)", a=a, h=at(11), c=C3)
    execute(connection, "INSERT INTO usage_tracking (user_id, date, hour, microphone_ms, message_count)"
            " VALUES (:b, :d, 11, 99000, 4)", b=b, d=DAY.date())  # fmt: skip
    execute(connection, "UPDATE usage_periods SET used_ms = 1 WHERE user_id = :a", a=a)
    execute(connection, "UPDATE subscriptions SET monthly_minutes_used = 999, limit_reached_at = :now"
            " WHERE user_id = :a", a=a, now=NOW)  # fmt: skip
    execute(connection, "DELETE FROM usage_periods WHERE user_id = :b", b=b)

    report = rebuild.rebuild(connection, at(10, 20), at(12, 10), NOW)

    restored = state(connection)
    outside = [row for row in restored["tracking"] if row[0] == a and row[2] == 13]
    assert outside[0][3] == 1, "a row outside the range is not touched"
    fixed_outside = [row if row is not outside[0] else next(r for r in good["tracking"] if r[:3] == row[:3])
                     for row in restored["tracking"]]  # fmt: skip
    assert {**restored, "tracking": fixed_outside} == good
    assert (report.start, report.end, report.events, report.periods_checked) == (at(10), at(13), 6, 2)
    assert report.hours_checked == 5  # a: 10, 11, 12; b: 10 and the spurious 11
    changes = {(c.table, c.what, c.key) for c in report.changes}
    assert changes == {
        ("usage_tracking", "corrected", f"user {a} hour 2027-01-15 10:00Z"),
        ("usage_tracking", "created", f"user {a} hour 2027-01-15 11:00Z"),
        ("usage_tracking", "corrected", f"user {a} hour 2027-01-15 12:00Z"),
        ("usage_tracking", "removed", f"user {b} hour 2027-01-15 11:00Z"),
        ("usage_hour_conversations", "created", f"user {a} hour 2027-01-15 10:00Z"),
        ("usage_hour_conversations", "removed", f"user {a} hour 2027-01-15 11:00Z"),
        ("usage_periods", "corrected", f"user {a} period 2027-01-01T00:00:00+00:00 to 2027-02-01T00:00:00+00:00"),
        ("usage_periods", "corrected",
         f"user {b} period 2026-12-31T18:30:00+00:00 to 2027-01-31T18:30:00+00:00"),
        ("subscriptions", "corrected", f"user {a}"),
    }  # fmt: skip
    detail = next(c.detail for c in report.changes if c.key.endswith("10:00Z") and c.table == "usage_tracking")
    assert detail == (
        "microphone_ms 2507500 -> 2502500, microphone_seconds 2507 -> 2502, conversation_count 7 -> 2,"
        " language_ms None -> {'en': 1902500, 'zh': 600000}"
    )
    assert report.users_changed == {str(a), str(b)}
    assert rebuild.rebuild(connection, at(10, 20), at(12, 10), NOW).changes == []


def test_conversations_stay_counted_once_after_a_rebuild(connection: sa.Connection, metered) -> None:
    a, _ = metered
    execute(connection, "DELETE FROM usage_hour_conversations WHERE user_id = :a", a=a)
    rebuild.rebuild(connection, at(10), at(11), NOW)
    pipeline.apply_events(connection, [event(a, "later-c1", at(10, 50), 5, conversation_id=C1),
                                       event(a, "later-c3", at(10, 51), 5, conversation_id=C3)], NOW)  # fmt: skip
    count = connection.execute(
        sa.text("SELECT conversation_count FROM usage_tracking WHERE user_id = :a AND hour = 10"), {"a": a}
    ).scalar_one()
    assert count == 3  # C1 and C2 from before, C3 new; C1 is not counted twice


def test_a_rebuild_that_finds_the_limit_reached_marks_the_subscription(connection: sa.Connection) -> None:
    user = insert_user(connection)
    pipeline.apply_events(connection, [event(user, "big", at(10), 3700)], NOW)
    execute(connection, "UPDATE usage_periods SET used_ms = 0 WHERE user_id = :u", u=user)
    execute(connection, "UPDATE subscriptions SET monthly_minutes_used = 0, limit_reached_at = NULL WHERE user_id = :u",
            u=user)  # fmt: skip
    report = rebuild.rebuild(connection, at(10), at(11), NOW)
    row = connection.execute(
        sa.text("SELECT monthly_minutes_used, limit_reached_at FROM subscriptions WHERE user_id = :u"), {"u": user}
    ).one()
    assert (row.monthly_minutes_used, row.limit_reached_at) == (61, NOW)
    assert [c.detail for c in report.changes if c.table == "subscriptions"] == [
        "monthly_minutes_used 0 -> 61, limit reached False -> True"
    ]
    audited = connection.execute(
        sa.text("SELECT new_values ->> 'limit_reached_at' FROM audit_logs WHERE user_id = :u AND actor = :actor"),
        {"u": user, "actor": rebuild.ACTOR},
    ).scalars()
    assert [datetime.fromisoformat(value) for value in audited] == [NOW]  # the change names its cause


def test_an_empty_range_is_refused(connection: sa.Connection) -> None:
    with pytest.raises(ValueError, match="must be before"):
        rebuild.rebuild(connection, at(11), at(10), NOW)


def test_microphone_seconds_cannot_be_written_wrong(connection: sa.Connection, metered) -> None:
    """The seed's whole-second column, the one dashboards read, is generated from microphone_ms (it used to
    be kept by a trigger, so a writer could set it alone and wrong, and a rebuild had to repair it): a
    write of it is refused, and a rebuild finds every hour right."""
    good = state(connection)
    with pytest.raises(sa.exc.ProgrammingError, match="generated column"), connection.begin_nested():
        execute(connection, "UPDATE usage_tracking SET microphone_seconds = microphone_seconds + 7 WHERE hour = 10")
    assert state(connection) == good

    report = rebuild.rebuild(connection, at(10), at(11), NOW)

    assert [c for c in report.changes if c.table == "usage_tracking"] == []
    assert state(connection) == good
