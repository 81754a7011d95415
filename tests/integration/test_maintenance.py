"""The periodic jobs against the real PostgreSQL and Redis: the job runner (advisory lock, maintenance_runs),
the five tasks called directly, partitions ahead, the statistics view, usage rolled into learning progress,
and the beat schedule."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from psycopg.types.json import Jsonb
from support.checks import archived_counts
from support.factories import december_learners, insert_user, use, utc
from support.run import environment

from worker import cli, db, quota
from worker.celery import app, create_app
from worker.config import BEAT_TASKS, SCHEDULE_DEFAULTS
from worker.maintenance import jobs, runner
from worker.maintenance import progress as learning
from worker.metering import pipeline
from worker.stripe import inbox, webhook
from worker.tasks import maintenance as tasks

JOBS = set(SCHEDULE_DEFAULTS)


def run_row(job: str) -> sa.Row | None:
    with db.engine().connect() as conn:
        return conn.execute(sa.text("SELECT * FROM maintenance_runs WHERE job = :job"), {"job": job}).first()


def answer(conn: sa.Connection) -> int:
    return conn.execute(sa.text("SELECT 41 + 1")).scalar_one()


# -- the job runner ----------------------------------------------------------------------------------------


def test_a_run_is_recorded_with_its_start_success_and_duration(committed: None) -> None:
    with freeze_time("2027-03-03T12:00:00Z"):
        run = runner.run_job("test_job", answer, lambda result: {"answer": result})

    assert (run.ran, run.result, run.as_dict()) == (True, 42, {"job": "test_job", "ran": True, "answer": 42})
    row = run_row("test_job")
    assert row.last_started_at == row.last_succeeded_at == utc(2027, 3, 3, 12)
    assert row.last_duration_ms >= 0 and row.last_error is None


def test_a_failed_run_is_rolled_back_and_records_its_error_until_a_success(committed: None) -> None:
    def fail(conn: sa.Connection) -> None:
        conn.execute(sa.text("INSERT INTO maintenance_runs (job) VALUES ('written_by_the_failed_run')"))
        raise RuntimeError("disk on fire")

    with freeze_time("2027-03-03T12:00:00Z"), pytest.raises(RuntimeError, match="disk on fire"):
        runner.run_job("test_job", fail, dict)

    failed = run_row("test_job")
    assert failed.last_started_at == utc(2027, 3, 3, 12) and failed.last_succeeded_at is None
    assert failed.last_error == "RuntimeError: disk on fire"
    assert run_row("written_by_the_failed_run") is None
    runner.run_job("test_job", answer, lambda result: {})
    assert run_row("test_job").last_error is None


def test_a_second_run_at_once_skips_and_an_operators_run_waits_for_the_first(committed: None) -> None:
    with db.engine().connect() as first, first.begin():
        first.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('worldspeak:maintenance:test_job'))"))
        skipped = runner.run_job("test_job", answer, lambda result: {})
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(runner.run_job, "test_job", answer, lambda result: {}, True)
            time.sleep(0.3)
            assert not waiting.done()
            first.commit()
            waited = waiting.result(timeout=10)

    assert (skipped.ran, skipped.result) == (False, None)
    assert (waited.ran, waited.result) == (True, 42)


# -- maintenance.reset_monthly_usage-------------------------------------------------------------------------


def test_the_reset_task_called_directly_moves_due_users_and_refreshes_their_quota(committed: None) -> None:
    with db.transaction() as conn:
        user = str(insert_user(conn))
        use(conn, uuid.UUID(user), utc(2026, 12, 31, 23, 40), 600)
    assert quota.check(user, utc(2026, 12, 31, 23, 59)).used_seconds == 600  # cached for December

    with freeze_time("2027-01-01T00:00:05Z"):
        result = tasks.reset_monthly_usage()

    assert result == {"job": "reset_monthly_usage", "ran": True, "users_moved": 1, "periods_archived": 1,
                      "users_deferred": 0}  # fmt: skip
    cached = quota.cached(user, utc(2027, 1, 1, 0, 0, 5))
    assert cached is not None and (cached.period_start, cached.used_seconds) == ("2027-01-01T00:00:00+00:00", 0)
    assert run_row("reset_monthly_usage").last_succeeded_at == utc(2027, 1, 1, 0, 0, 5)


def test_two_reset_tasks_at_once_give_one_archive_row_per_period(committed: None) -> None:
    users = december_learners(30)
    start = threading.Barrier(2)

    def reset() -> dict:
        start.wait()
        return tasks.reset_monthly_usage(now="2027-01-01T00:01:00+00:00")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: reset(), range(2)))

    assert sum(result.get("periods_archived", 0) for result in results) == len(users)
    assert set(archived_counts(users).values()) == {1}


@pytest.mark.parametrize("now", ["2027-01-01T00:00:00", "yesterday", 1767225600])
def test_the_reset_task_rejects_a_malformed_time(now: object) -> None:
    with pytest.raises(ValueError, match="ISO-8601 time with a UTC offset"):
        tasks.reset_monthly_usage(now=now)


def test_reset_due_resets_for_the_given_time_and_repeats_harmlessly(
    committed: None, capsys: pytest.CaptureFixture
) -> None:
    december_learners(2)

    assert cli.main(["reset-due", "--now", "2027-01-01T00:00:30Z"]) == 0
    assert cli.main(["reset-due", "--now", "2027-01-01T00:00:31Z"]) == 0

    first, second = capsys.readouterr().out.splitlines()
    assert "2 subscriptions moved to their next period, 2 periods archived" in first
    assert "0 subscriptions moved to their next period, 0 periods archived" in second


def test_reset_due_refuses_a_time_without_offset(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reset-due", "--now", "2027-01-01T00:00:30"])
    assert exit_info.value.code == 2
    assert "no UTC offset" in capsys.readouterr().err


# -- jobs.ensure_partitions ----------------------------------------------------------------------------


def partitions(conn: sa.Connection) -> set[str]:
    return set(
        conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'public.messages'::regclass"
            )
        ).scalars()
    )


def test_partitions_a_year_ahead_are_all_there_and_a_second_run_creates_none(connection: sa.Connection) -> None:
    first = jobs.ensure_partitions(connection, utc(2031, 5, 17, 8), months_ahead=12)
    second = jobs.ensure_partitions(connection, utc(2031, 5, 17, 9), months_ahead=12)

    months = [f"messages_{2031 + (4 + n) // 12}_{(4 + n) % 12 + 1:02}" for n in range(13)]
    assert first.created == months and months[-1] == "messages_2032_05"
    assert second.created == []
    assert partitions(connection) >= {*months, "messages_default"}
    bounds = connection.execute(
        sa.text("SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = 'messages_2031_12'")
    ).scalar_one()
    assert bounds == "FOR VALUES FROM ('2031-12-01 00:00:00+00') TO ('2032-01-01 00:00:00+00')"


def test_a_message_left_in_the_default_partition_moves_when_its_month_is_created(connection: sa.Connection) -> None:
    user = insert_user(connection)
    conversation = connection.execute(
        sa.text(
            "INSERT INTO conversations (user_id, language_pair, scenario)"
            ' VALUES (:u, \'{"native": "ja", "target": "en"}\', \'cafe\') RETURNING id'
        ),
        {"u": user},
    ).scalar_one()
    message = connection.execute(
        sa.text(
            "INSERT INTO messages (conversation_id, user_id, content, language, created_at)"
            " VALUES (:c, :u, 'Hello', 'en', '2031-08-31T23:59:59.999+00:00') RETURNING id"
        ),
        {"c": conversation, "u": user},
    ).scalar_one()

    def home() -> str:
        query = "SELECT tableoid::regclass::text FROM messages WHERE id = :id"
        return connection.execute(sa.text(query), {"id": message}).scalar_one()

    assert home() == "messages_default"
    assert jobs.ensure_partitions(connection, utc(2031, 8, 2), months_ahead=0).created == ["messages_2031_08"]
    assert home() == "messages_2031_08"
    count = connection.execute(sa.text("SELECT count(*) FROM messages_default WHERE id = :id"), {"id": message})
    assert count.scalar_one() == 0


def test_a_partition_another_run_created_first_is_no_error(fresh_database_url: str) -> None:
    engine = db.create_db_engine(fresh_database_url, pool_size=2)
    try:
        with engine.connect() as other, engine.connect() as conn, ThreadPoolExecutor(1) as pool:
            with other.begin():  # another run has created August and not committed yet
                other.execute(sa.text("SELECT create_monthly_partition('2031-08-01')"))
                ours = pool.submit(jobs.ensure_partitions, conn, utc(2031, 8, 2), 1)
                time.sleep(0.3)
                assert not ours.done()  # waiting for the partition function's lock, not failing
            ours.result(timeout=10)
            conn.commit()
            assert partitions(conn) >= {"messages_2031_08", "messages_2031_09"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("months_ahead", [-1, 121, "3", 2.5, True, None])
def test_ensure_partitions_refuses_a_bad_months_ahead(connection: sa.Connection, months_ahead: object) -> None:
    with pytest.raises(ValueError, match="months_ahead"):
        jobs.ensure_partitions(connection, utc(2031, 1, 1), months_ahead)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="months_ahead"):
        tasks.ensure_partitions(months_ahead=months_ahead)


def test_the_partitions_task_called_directly(committed: None) -> None:
    try:
        with freeze_time("2091-01-15T00:00:00Z"):
            result = tasks.ensure_partitions(months_ahead=1)
        assert result == {"job": "ensure_partitions", "ran": True, "created": ["messages_2091_01", "messages_2091_02"]}
        assert tasks.ensure_partitions(now="2091-01-20T00:00:00Z", months_ahead=1)["created"] == []
    finally:
        with db.transaction() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS messages_2091_01, messages_2091_02"))


# -- jobs.refresh_materialized_views -------------------------------------------------------------------


def test_the_view_is_filled_normally_once_then_refreshed_concurrently(connection: sa.Connection) -> None:
    connection.execute(sa.text("REFRESH MATERIALIZED VIEW user_statistics WITH NO DATA"))
    assert jobs.refresh_materialized_views(connection).mode == "populated"
    user = insert_user(connection, full_name="Newly Arrived")

    assert jobs.refresh_materialized_views(connection).mode == "concurrently"

    query = "SELECT full_name, plan_type FROM user_statistics WHERE user_id = :u"
    assert tuple(connection.execute(sa.text(query), {"u": user}).one()) == ("Newly Arrived", "free")


def test_a_refresh_is_skipped_while_another_one_runs(connection: sa.Connection) -> None:
    with db.engine().connect() as other, other.begin():
        other.execute(sa.text("REFRESH MATERIALIZED VIEW CONCURRENTLY user_statistics"))
        assert jobs.refresh_materialized_views(connection).mode == "skipped"
    assert connection.execute(sa.text("SELECT count(*) >= 0 FROM user_statistics")).scalar_one()


def test_the_refresh_task_called_directly(committed: None) -> None:
    assert tasks.refresh_materialized_views() == {"job": "refresh_materialized_views", "ran": True,
                                                  "mode": "concurrently"}  # fmt: skip


# -- learning.aggregate_usage ------------------------------------------------------------------------------


def studied(conn: sa.Connection, user: uuid.UUID, language: str, started: datetime, seconds: float) -> None:
    event = {"event_id": uuid.uuid4().hex, "user_id": str(user), "started_at": started.isoformat(),
             "seconds": seconds, "language": language}  # fmt: skip
    assert pipeline.apply_events(conn, [event], started).accepted


def progress(conn: sa.Connection, user: uuid.UUID) -> dict[str, sa.Row]:
    rows = conn.execute(
        sa.text(
            "SELECT language_code, total_study_ms, total_study_time_minutes, last_study_date, consecutive_days,"
            " weekly_achieved_minutes FROM learning_progress WHERE user_id = :u"
        ),
        {"u": user},
    )
    return {row.language_code: row for row in rows}


def language_settings(conn: sa.Connection, user: uuid.UUID) -> dict[str, tuple[str, int]]:
    query = "SELECT language_code, proficiency_level, total_learning_minutes FROM language_settings WHERE user_id = :u"
    return {row[0]: (row[1], row[2]) for row in conn.execute(sa.text(query), {"u": user})}


def streak_achievements(conn: sa.Connection, user: uuid.UUID) -> dict[str, sa.Row]:
    query = "SELECT * FROM achievements WHERE user_id = :u AND achievement_type = 'streak'"
    return {row.achievement_code: row for row in conn.execute(sa.text(query), {"u": user})}


def test_finished_hours_roll_into_progress_exactly_once(connection: sa.Connection) -> None:
    user = insert_user(connection, proficiency_levels=Jsonb({"en": "intermediate"}))
    studied(connection, user, "en", utc(2027, 3, 3, 10), 90)
    studied(connection, user, "ja", utc(2027, 3, 3, 10, 20), 45)
    studied(connection, user, "en", utc(2027, 3, 3, 11, 10), 30)  # its hour has not ended at 11:30

    first = learning.aggregate_usage(connection, utc(2027, 3, 3, 11, 30))
    again = learning.aggregate_usage(connection, utc(2027, 3, 3, 11, 45))

    assert (first.hours, first.users, first.minutes) == (1, {str(user)}, 1)
    assert (again.hours, again.minutes) == (0, 0)
    rows = progress(connection, user)
    en, ja = rows["en"], rows["ja"]
    assert (en.total_study_ms, en.total_study_time_minutes, en.weekly_achieved_minutes) == (90_000, 1, 1)
    assert (en.last_study_date, en.consecutive_days) == (date(2027, 3, 3), 1)
    assert (ja.total_study_ms, ja.total_study_time_minutes) == (45_000, 0)
    assert language_settings(connection, user) == {"en": ("intermediate", 1), "ja": ("beginner", 0)}
    hours = connection.execute(
        sa.text("SELECT hour, is_aggregated, aggregated_ms FROM usage_tracking WHERE user_id = :u ORDER BY hour"),
        {"u": user},
    ).all()
    assert [tuple(row) for row in hours] == [(10, True, 135_000), (11, False, 0)]

    learning.aggregate_usage(connection, utc(2027, 3, 3, 12))
    assert progress(connection, user)["en"].total_study_time_minutes == 2  # 120 s, exactly two minutes
    assert language_settings(connection, user)["en"] == ("intermediate", 2)


def test_minutes_come_from_the_exact_total_not_from_each_hour(connection: sa.Connection) -> None:
    user = insert_user(connection)
    for hour in range(3):  # 40 s an hour: no hour alone makes a minute, together they make two
        studied(connection, user, "zh", utc(2027, 3, 3, hour, 10), 40)
        learning.aggregate_usage(connection, utc(2027, 3, 3, hour + 1))

    zh = progress(connection, user)["zh"]
    assert (zh.total_study_ms, zh.total_study_time_minutes) == (120_000, 2)
    assert language_settings(connection, user)["zh"] == ("beginner", 2)


def test_late_usage_for_an_aggregated_hour_is_rolled_up_by_its_difference_only(connection: sa.Connection) -> None:
    user = insert_user(connection)
    studied(connection, user, "en", utc(2027, 3, 3, 10), 50)
    learning.aggregate_usage(connection, utc(2027, 3, 3, 11))
    late = {"event_id": "late", "user_id": str(user), "started_at": "2027-03-03T10:30:00Z", "seconds": 20.5,
            "language": "en"}  # fmt: skip
    pipeline.apply_events(connection, [late], utc(2027, 3, 3, 11, 10))

    rolled = learning.aggregate_usage(connection, utc(2027, 3, 3, 11, 15))
    learning.aggregate_usage(connection, utc(2027, 3, 3, 11, 20))

    assert (rolled.hours, rolled.minutes) == (1, 1)
    en = progress(connection, user)["en"]
    assert (en.total_study_ms, en.total_study_time_minutes) == (70_500, 1)
    aggregated = connection.execute(
        sa.text("SELECT aggregated_ms, aggregated_breakdown FROM usage_tracking WHERE user_id = :u"), {"u": user}
    ).one()
    assert tuple(aggregated) == (70_500, {"en": 70.5})


def test_streaks_count_days_in_the_learners_zone_and_restart_after_a_missed_day(connection: sa.Connection) -> None:
    user = insert_user(connection, timezone="Asia/Tokyo")  # +09:00
    studied(connection, user, "en", utc(2027, 3, 1, 14, 30), 60)  # 23:30 on 1 March in Tokyo
    studied(connection, user, "en", utc(2027, 3, 1, 15, 30), 60)  # 00:30 on 2 March in Tokyo, same UTC day
    learning.aggregate_usage(connection, utc(2027, 3, 1, 17))
    assert (progress(connection, user)["en"].consecutive_days, progress(connection, user)["en"].last_study_date) == (
        2,
        date(2027, 3, 2),
    )

    for day in range(3, 8):  # 3 to 7 March, 19:00 in Tokyo, rolled up in one run
        studied(connection, user, "en", utc(2027, 3, day, 10), 60)
    week = learning.aggregate_usage(connection, utc(2027, 3, 7, 12))

    assert progress(connection, user)["en"].consecutive_days == 7
    assert week.achievements == 1
    seven = streak_achievements(connection, user)["STREAK_7"]
    assert (seven.name, seven.criteria, seven.is_earned) == (
        {"en": "7-Day Streak", "ja": "7日連続学習"},
        {"consecutive_days": 7},
        True,
    )
    assert seven.description["ja"] == "7日間連続で学習"

    studied(connection, user, "en", utc(2027, 3, 8, 10), 60)  # 8 March studied, 9 March missed
    studied(connection, user, "en", utc(2027, 3, 10, 10), 60)
    learning.aggregate_usage(connection, utc(2027, 3, 8, 12))
    assert progress(connection, user)["en"].consecutive_days == 8
    learning.aggregate_usage(connection, utc(2027, 3, 10, 12))

    restarted = progress(connection, user)["en"]
    assert (restarted.consecutive_days, restarted.last_study_date) == (1, date(2027, 3, 10))
    assert set(streak_achievements(connection, user)) == {"STREAK_7"}


def test_thirty_days_in_a_row_earn_both_streaks_once(connection: sa.Connection) -> None:
    user = insert_user(connection)
    events = [
        {"event_id": f"day-{day}", "user_id": str(user), "started_at": (utc(2027, 3, 1, 9) + timedelta(days=day))
         .isoformat(), "seconds": 30, "language": "fr"}
        for day in range(30)
    ]  # fmt: skip
    pipeline.apply_events(connection, events, utc(2027, 3, 30, 10))

    first = learning.aggregate_usage(connection, utc(2027, 3, 30, 12))
    again = learning.aggregate_usage(connection, utc(2027, 3, 30, 13))

    assert (first.achievements, again.achievements) == (2, 0)
    assert progress(connection, user)["fr"].consecutive_days == 30
    earned = streak_achievements(connection, user)
    assert set(earned) == {"STREAK_7", "STREAK_30"}
    assert earned["STREAK_30"].name == {"en": "30-Day Streak", "ja": "30日連続学習"}


def test_weekly_minutes_count_the_learners_current_week_only(connection: sa.Connection) -> None:
    steady = insert_user(connection)
    lapsed = insert_user(connection)
    studied(connection, steady, "en", utc(2027, 2, 28, 9), 300)  # Sunday: last week
    studied(connection, steady, "en", utc(2027, 3, 1, 9), 180)  # Monday 1 March 2027
    studied(connection, steady, "en", utc(2027, 3, 3, 9), 120)
    studied(connection, lapsed, "en", utc(2027, 3, 2, 9), 240)
    learning.aggregate_usage(connection, utc(2027, 3, 3, 12))
    assert progress(connection, steady)["en"].weekly_achieved_minutes == 5
    assert progress(connection, steady)["en"].total_study_time_minutes == 10

    studied(connection, steady, "en", utc(2027, 3, 8, 9), 60)  # the next Monday
    learning.aggregate_usage(connection, utc(2027, 3, 8, 12))

    assert progress(connection, steady)["en"].weekly_achieved_minutes == 1
    assert progress(connection, lapsed)["en"].weekly_achieved_minutes == 0
    assert progress(connection, lapsed)["en"].total_study_time_minutes == 4


def test_the_aggregation_task_called_directly(committed: None) -> None:
    with db.transaction() as conn:
        user = insert_user(conn)
        studied(conn, user, "en", utc(2027, 3, 3, 10), 61)

    with freeze_time("2027-03-03T11:00:00Z"):
        first = tasks.aggregate_usage()
        again = tasks.aggregate_usage()

    assert first == {"job": "aggregate_usage", "ran": True, "hours": 1, "users": 1, "minutes": 1, "achievements": 0}
    assert (again["hours"], again["minutes"]) == (0, 0)


# -- maintenance.sweep ----------------------------------------------------------------------------------------


def test_the_sweep_task_called_directly_requeues_inbox_rows_left_behind(committed: None) -> None:
    received = utc(2027, 3, 3, 12)
    event = {"id": "evt_left_behind", "object": "event", "type": "customer.created", "created": 1_804_000_000,
             "data": {"object": {"id": "cus_1", "object": "customer"}}}  # fmt: skip
    with db.transaction() as conn:
        webhook.store(conn, event, received)

    early = tasks.sweep(now=(received + timedelta(minutes=1)).isoformat())
    late = tasks.sweep(now=(received + inbox.REQUEUE_AFTER).isoformat())

    assert early == {"job": "sweep", "ran": True, "requeued": 0, "dead_lettered": 0}
    assert late == {"job": "sweep", "ran": True, "requeued": 1, "dead_lettered": 0}


# -- the beat schedule ----------------------------------------------------------------------------------------


def test_the_beat_schedule_runs_every_job_on_its_tasks_queue() -> None:
    app.loader.import_default_modules()
    with environment(STRIPE_API_KEY="sk_test_reconcile"):
        schedule = create_app().conf.beat_schedule

    assert {entry["task"] for entry in schedule.values()} == set(BEAT_TASKS.values())
    assert {job for job, task in BEAT_TASKS.items() if not task.startswith("maintenance.")} == {
        "stripe_reconcile",
        "expire_sessions",
    }
    assert "stripe.reconcile" not in app.conf.beat_schedule  # without STRIPE_API_KEY there is nothing to reconcile
    for job, interval in SCHEDULE_DEFAULTS.items():
        entry = schedule[BEAT_TASKS[job]]
        assert entry["task"] in app.tasks
        queue = {"sessions": "maintenance"}.get(entry["task"].split(".")[0], entry["task"].split(".")[0])
        assert app.amqp.router.route({}, entry["task"])["queue"].name == queue  # sessions.expire: maintenance
        assert entry["schedule"] == interval and entry["options"]["expires"] == interval
    assert app.conf.beat_scheduler == "redbeat.RedBeatScheduler"
    assert app.conf.redbeat_lock_timeout > app.conf.beat_max_loop_interval


def test_every_jobs_interval_comes_from_its_variable() -> None:
    variables = {f"SCHEDULE_{job.upper()}_SECONDS": str(10 + n) for n, job in enumerate(sorted(JOBS))}
    with environment(**variables, STRIPE_API_KEY="sk_test_reconcile"):
        schedule = create_app().conf.beat_schedule
    assert {entry["task"]: entry["schedule"] for entry in schedule.values()} == {
        BEAT_TASKS[job]: 10.0 + n for n, job in enumerate(sorted(JOBS))
    }


def test_a_second_beat_cannot_take_the_schedulers_lock(committed: None) -> None:
    from redbeat.schedulers import RedBeatScheduler, acquire_distributed_beat_lock, get_redis

    first = RedBeatScheduler(app=app)
    acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=first))
    try:
        client = get_redis(app)
        assert not client.lock(first.lock_key, timeout=first.lock_timeout).acquire(blocking=False)
        assert all(client.exists(f"redbeat:{name}") for name in app.conf.beat_schedule)
    finally:
        first.lock.release()


def test_a_worker_runs_a_maintenance_task_sent_by_name(committed: None, thread_worker: object) -> None:
    users = december_learners(3)

    app.send_task("maintenance.reset_monthly_usage", kwargs={"now": "2027-01-01T00:00:10Z"})

    deadline = time.monotonic() + 20
    while (run_row("reset_monthly_usage") is None or run_row("reset_monthly_usage").last_succeeded_at is None) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert set(archived_counts(users).values()) == {1}
