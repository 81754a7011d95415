"""Billing periods and the monthly reset (periods.advance_due) against the real database: calendar months in
the learner's zone across year ends, leap days and daylight-saving changes, catching up, exactly once with
two runs at once, and never waiting for rows metering holds."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import sqlalchemy as sa
from support.checks import archived_counts
from support.factories import december_learners, insert_user, use, utc

from worker import db, periods
from worker.metering import pipeline

MINUTE_MS = 60_000


def subscription(conn: sa.Connection, user: uuid.UUID) -> sa.Row:
    return conn.execute(
        sa.text(
            "SELECT current_period_start, current_period_end, reset_date, monthly_minutes_used, limit_reached_at,"
            " plan_type FROM subscriptions WHERE user_id = :u"
        ),
        {"u": user},
    ).one()


def period_rows(conn: sa.Connection, user: uuid.UUID) -> list[sa.Row]:
    return conn.execute(
        sa.text(
            "SELECT period_start, period_end, used_ms, overage_ms, archived_at, plan_type, limit_ms"
            " FROM usage_periods WHERE user_id = :u ORDER BY period_start"
        ),
        {"u": user},
    ).all()


def test_reset_over_the_new_year_archives_december_and_starts_january(connection: sa.Connection) -> None:
    user = insert_user(connection)
    use(connection, user, utc(2026, 12, 31, 23, 59, 30), 60)  # 30 s in each year

    before = periods.advance_due(connection, utc(2026, 12, 31, 23, 59, 59))
    result = periods.advance_due(connection, utc(2027, 1, 1, 0, 0, 5))

    assert before.users == set() and before.periods_archived == 0
    assert result.users == {str(user)} and result.periods_archived == 1 and result.busy == set()
    december, january = period_rows(connection, user)
    assert (december.period_start, december.period_end, december.used_ms) == (utc(2026, 12, 1), utc(2027, 1, 1), 30_000)
    assert december.archived_at == utc(2027, 1, 1, 0, 0, 5)
    assert (january.period_start, january.period_end, january.used_ms) == (utc(2027, 1, 1), utc(2027, 2, 1), 30_000)
    assert january.archived_at is None
    current = subscription(connection, user)
    assert (current.current_period_start, current.current_period_end) == (utc(2027, 1, 1), utc(2027, 2, 1))
    assert current.reset_date.isoformat() == "2027-02-01"


def test_reset_over_29_february_2028(connection: sa.Connection) -> None:
    user = insert_user(connection)
    use(connection, user, utc(2028, 2, 29, 23, 59, 50), 20)

    result = periods.advance_due(connection, utc(2028, 3, 1, 0, 0, 10))

    assert result.periods_archived == 1
    february, march = period_rows(connection, user)
    assert february.period_end - february.period_start == timedelta(days=29)
    assert (february.used_ms, march.used_ms) == (10_000, 10_000)
    assert march.period_start == utc(2028, 3, 1) and march.period_end == utc(2028, 4, 1)
    assert subscription(connection, user).reset_date.isoformat() == "2028-04-01"


def test_a_learner_in_kolkata_is_reset_at_their_midnight_not_utc(connection: sa.Connection) -> None:
    kolkata = insert_user(connection, timezone="Asia/Kolkata")  # +05:30
    london = insert_user(connection, timezone="Europe/London")  # +00:00 in winter
    use(connection, kolkata, utc(2026, 12, 31, 18, 29, 30), 60)  # 23:59:30 to 00:00:30 in Kolkata
    use(connection, london, utc(2026, 12, 31, 18, 29, 30), 60)

    assert periods.advance_due(connection, utc(2026, 12, 31, 18, 29, 59)).users == set()
    result = periods.advance_due(connection, utc(2026, 12, 31, 18, 30))

    assert result.users == {str(kolkata)}
    december, january = period_rows(connection, kolkata)
    assert (december.period_start, december.period_end) == (utc(2026, 11, 30, 18, 30), utc(2026, 12, 31, 18, 30))
    assert (december.used_ms, january.used_ms) == (30_000, 30_000)
    current = subscription(connection, kolkata)
    assert (current.current_period_start, current.current_period_end) == (
        utc(2026, 12, 31, 18, 30),
        utc(2027, 1, 31, 18, 30),
    )
    assert current.reset_date.isoformat() == "2027-02-01"  # the local date the period ends
    assert periods.advance_due(connection, utc(2027, 1, 1)).users == {str(london)}


def test_a_learner_in_new_york_keeps_local_midnight_across_daylight_saving(connection: sa.Connection) -> None:
    user = insert_user(connection, timezone="America/New_York")
    use(connection, user, utc(2027, 3, 10, 12), 120)  # clocks go forward on 14 March 2027

    assert periods.advance_due(connection, utc(2027, 4, 1, 3, 59, 59)).users == set()
    result = periods.advance_due(connection, utc(2027, 4, 1, 4))  # midnight EDT

    assert result.periods_archived == 1
    (march,) = [row for row in period_rows(connection, user) if row.archived_at is not None]
    assert (march.period_start, march.period_end) == (utc(2027, 3, 1, 5), utc(2027, 4, 1, 4))  # EST to EDT
    assert march.period_end - march.period_start == timedelta(days=31, hours=-1)
    assert march.used_ms == 120_000
    current = subscription(connection, user)
    assert (current.current_period_start, current.current_period_end) == (utc(2027, 4, 1, 4), utc(2027, 5, 1, 4))


def test_an_unknown_or_empty_zone_means_utc_months(connection: sa.Connection) -> None:
    misspelt = insert_user(connection, timezone="Mars/Olympus_Mons")
    empty = insert_user(connection, timezone="")
    for user in (misspelt, empty):
        use(connection, user, utc(2027, 1, 31, 23), 60)

    assert periods.advance_due(connection, utc(2027, 2, 1)).users == {str(misspelt), str(empty)}
    assert subscription(connection, misspelt).current_period_start == utc(2027, 2, 1)


def test_a_reset_three_months_late_archives_each_missed_period(connection: sa.Connection) -> None:
    user = insert_user(connection)
    use(connection, user, utc(2026, 10, 15), 90)

    result = periods.advance_due(connection, utc(2027, 1, 15))

    assert result.periods_archived == 3
    rows = period_rows(connection, user)
    assert [(row.period_start.month, row.archived_at is not None) for row in rows] == [
        (10, True), (11, True), (12, True), (1, False),
    ]  # fmt: skip
    assert [row.used_ms for row in rows] == [90_000, 0, 0, 0]
    assert subscription(connection, user).current_period_start == utc(2027, 1, 1)


def test_a_reset_run_twice_archives_once(connection: sa.Connection) -> None:
    user = insert_user(connection)
    use(connection, user, utc(2027, 1, 20), 30)
    now = utc(2027, 2, 1, 0, 1)

    first = periods.advance_due(connection, now)
    second = periods.advance_due(connection, now + timedelta(minutes=1))

    assert (first.periods_archived, second.periods_archived, second.users) == (1, 0, set())
    january = period_rows(connection, user)[0]
    assert january.archived_at == now and january.used_ms == 30_000


def test_the_reset_clears_the_limit_and_carries_overage_into_the_archive(connection: sa.Connection) -> None:
    user = insert_user(connection)
    for hour in range(2):  # 120 minutes on the free plan's 60
        use(connection, user, utc(2027, 1, 30, 10 + hour), 3600)
    assert subscription(connection, user).limit_reached_at is not None

    periods.advance_due(connection, utc(2027, 2, 1))

    january = period_rows(connection, user)[0]
    assert (january.used_ms, january.overage_ms, january.plan_type) == (120 * MINUTE_MS, 60 * MINUTE_MS, "free")
    current = subscription(connection, user)
    assert current.limit_reached_at is None and current.monthly_minutes_used == 0


def test_late_usage_for_an_archived_period_updates_that_archive(connection: sa.Connection) -> None:
    user = insert_user(connection)
    use(connection, user, utc(2027, 1, 31, 23), 60)
    periods.advance_due(connection, utc(2027, 2, 1, 0, 5))
    late = {"event_id": "late-1", "user_id": str(user), "started_at": "2027-01-31T23:30:00Z", "seconds": 45,
            "language": "en"}  # fmt: skip

    pipeline.apply_events(connection, [late], utc(2027, 2, 1, 0, 10))

    january, february = period_rows(connection, user)
    assert (january.used_ms, january.archived_at is not None) == (105_000, True)
    assert february.used_ms == 0
    assert subscription(connection, user).current_period_start == utc(2027, 2, 1)


def test_a_period_before_the_first_known_one_is_born_archived(connection: sa.Connection) -> None:
    user = insert_user(connection)
    now = utc(2027, 2, 3)
    late = {"event_id": "from-january", "user_id": str(user), "started_at": "2027-01-20T10:00:00Z", "seconds": 60,
            "language": "en"}  # fmt: skip

    pipeline.apply_events(connection, [late], now)

    january, february = period_rows(connection, user)
    assert (january.used_ms, january.archived_at) == (60_000, now)
    assert (february.used_ms, february.archived_at) == (0, None)
    assert periods.advance_due(connection, now).periods_archived == 0


def test_stripe_plans_move_to_their_predicted_next_period(connection: sa.Connection) -> None:
    user = insert_user(connection)
    use(connection, user, utc(2027, 1, 20), 60)
    connection.execute(
        sa.text(
            "UPDATE subscriptions SET plan_type = 'standard', monthly_minutes_limit = 900,"
            " stripe_subscription_id = 'sub_1',"
            " current_period_start = '2027-01-15T09:00:00Z', current_period_end = '2027-02-15T09:00:00Z'"
            " WHERE user_id = :u"
        ),
        {"u": user},
    )

    periods.advance_due(connection, utc(2027, 2, 15, 9))

    current = subscription(connection, user)
    assert (current.current_period_start, current.current_period_end) == (utc(2027, 2, 15, 9), utc(2027, 3, 15, 9))
    assert current.plan_type == "standard"
    assert period_rows(connection, user)[-1].limit_ms == 900 * MINUTE_MS


def test_two_resets_at_once_on_two_connections_archive_each_period_once(committed: None) -> None:
    users = december_learners(60)
    start = threading.Barrier(2)

    def reset() -> periods.ResetResult:
        with db.engine().connect() as conn, conn.begin():
            start.wait()
            return periods.advance_due(conn, utc(2027, 1, 1, 0, 1))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: reset(), range(2)))

    assert results[0].users.isdisjoint(results[1].users)
    assert sum(result.periods_archived for result in results) == len(users)
    assert set(archived_counts(users).values()) == {1}


def test_a_reset_skips_users_whose_periods_metering_holds_instead_of_waiting(committed: None) -> None:
    (user,) = december_learners(1)
    now = utc(2027, 1, 1, 0, 1)
    with db.engine().connect() as metering_conn, db.engine().connect() as reset_conn:
        with metering_conn.begin():
            # a metering batch half-way: its period rows locked, the subscription update still to come
            metering_conn.execute(sa.text("SELECT id FROM usage_periods WHERE user_id = :u FOR UPDATE"), {"u": user})
            with reset_conn.begin():
                reset_conn.execute(sa.text("SET LOCAL lock_timeout = '2s'"))  # waiting would fail the test
                held = periods.advance_due(reset_conn, now)
            metering_conn.execute(
                sa.text("UPDATE subscriptions SET monthly_minutes_used = 1 WHERE user_id = :u"), {"u": user}
            )
        with reset_conn.begin():
            later = periods.advance_due(reset_conn, now)

    assert (held.users, held.busy, held.periods_archived) == (set(), {str(user)}, 0)
    assert (later.users, later.periods_archived) == ({str(user)}, 1)
    assert archived_counts([user]) == {str(user): 1}


def test_a_period_the_app_set_without_a_period_row_is_archived_when_it_ends(connection: sa.Connection) -> None:
    """The app created the subscription itself (no usage_periods row) and usage from before that is in the
    ledger: the reset archives that period with its exact usage, so the history has no hole."""
    user = insert_user(connection)
    connection.execute(
        sa.text(
            "INSERT INTO subscriptions (user_id, plan_type, status, current_period_start, current_period_end,"
            " reset_date, monthly_minutes_limit) VALUES (:u, 'standard', 'active', :start, :end, :end, 900)"
        ),
        {"u": user, "start": utc(2026, 12, 10), "end": utc(2027, 1, 10)},
    )
    connection.execute(  # recorded in the ledger, never metered into a period (as by a bulk import)
        sa.text(
            "INSERT INTO usage_events (event_id, user_id, started_at, duration_ms, language, received_at)"
            " VALUES ('imported', :u, :started, 90500, 'en', :started)"
        ),
        {"u": user, "started": utc(2027, 1, 9, 23, 58)},
    )

    result = periods.advance_due(connection, utc(2027, 1, 10, 0, 0, 5))

    assert result.periods_archived == 1
    rows = period_rows(connection, user)
    assert [(row.period_start, row.period_end, row.used_ms, row.archived_at is not None) for row in rows] == [
        (utc(2026, 12, 10), utc(2027, 1, 10), 90_500, True),
        (utc(2027, 1, 10), utc(2027, 2, 1), 0, False),  # no Stripe subscription: on to the calendar month
    ]
    assert (rows[0].plan_type, rows[0].limit_ms) == ("standard", 900 * MINUTE_MS)
