"""Metering through real Celery workers on the real brokers: many processes, duplicates, kills, cut connections.

The worker-process tests run on Redis and on RabbitMQ. Every test ends by comparing the database with
totals computed from the events alone.
"""

from __future__ import annotations

import random
import threading
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa
from celery import Celery
from support.checks import assert_exact, scalar, wait_until
from support.factories import event, make_events, make_users
from support.run import TEST_ENV, flush_redis
from support.workers import Broker

from worker import db, quota
from worker.celery import app
from worker.metering import pipeline

pytestmark = pytest.mark.usefixtures("committed")


def publish(producer: Celery, events: list[dict], batch_size: int) -> None:
    for start in range(0, len(events), batch_size):
        producer.send_task("metering.record_usage_batch", args=[events[start : start + batch_size]])


@pytest.mark.slow
def test_several_worker_processes_count_10000_events_with_duplicates_exactly(spawn_worker, broker: Broker) -> None:
    now = datetime.now(UTC)
    users = make_users(30)
    events = make_events(users, 10_000, now)
    duplicates = random.Random(3).sample(events, 1_000)
    spawn_worker(concurrency=2, env=broker.env)
    spawn_worker(concurrency=2, env=broker.env)
    stream = events + duplicates
    random.Random(5).shuffle(stream)
    publish(broker.app, stream[:9_000], 250)
    for item in stream[9_000:]:  # the single-event path, coalesced by the workers
        broker.app.send_task("metering.record_usage", args=[item])
    wait_until(lambda: scalar("SELECT count(*) FROM usage_events") == 10_000, 120, "10,000 ledger rows")
    wait_until(lambda: scalar("SELECT count(*) FROM usage_events") == 10_000, 1, "no more rows")
    assert_exact(users, events)


@pytest.mark.slow
def test_a_worker_killed_mid_stream_is_redelivered_and_counted_once(spawn_worker, broker: Broker) -> None:
    now = datetime.now(UTC)
    users = make_users(10)
    events = make_events(users, 6_000, now, seed=11)
    short_visibility = {"CELERY_VISIBILITY_TIMEOUT": "2", **broker.env}  # RabbitMQ redelivers at once
    victim = spawn_worker(concurrency=2, env=short_visibility)
    publish(broker.app, events, 100)
    wait_until(lambda: scalar("SELECT count(*) FROM usage_events") >= 500, 60, "the stream to start")
    victim.kill()
    done_before_restart = scalar("SELECT count(*) FROM usage_events")
    assert done_before_restart < len(events), "the worker finished before it could be killed"
    publish(broker.app, random.Random(1).sample(events, 300), 100)  # producers retrying on their side too
    spawn_worker(concurrency=2, env=short_visibility)
    wait_until(lambda: scalar("SELECT count(*) FROM usage_events") == len(events), 120, "every event after restart")
    assert_exact(users, events)


def test_a_connection_cut_mid_batch_is_retried_and_exact(thread_worker) -> None:
    now = datetime.now(UTC)
    users = make_users(3)
    events = make_events(users, 300, now, seed=13)
    cuts: list[int] = []

    def cut_connection(conn, cursor, statement, parameters, context, executemany) -> None:
        if "UPDATE usage_periods" in statement and not cuts and threading.current_thread() is not main_thread:
            pid = conn.connection.driver_connection.info.backend_pid
            cuts.append(pid)
            with psycopg.connect(TEST_ENV["DATABASE_URL"], autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    main_thread = threading.current_thread()
    sa.event.listen(db.engine(), "before_cursor_execute", cut_connection)
    try:
        publish(app, events, 300)
        wait_until(lambda: scalar("SELECT count(*) FROM usage_events") == 300, 60, "the retried batch")
    finally:
        sa.event.remove(db.engine(), "before_cursor_execute", cut_connection)
    assert len(cuts) == 1
    assert_exact(users, events)


def test_the_single_event_path_coalesces_into_few_transactions(thread_worker) -> None:
    now = datetime.now(UTC)
    users = make_users(2)
    events = make_events(users, 400, now, seed=17)
    for item in events + events[:40]:
        app.send_task("metering.record_usage", kwargs={"event": item})
    bad = {"event_id": "bad-1", "user_id": str(uuid.uuid4()), "started_at": "x", "seconds": 1, "language": "en"}
    app.send_task("metering.record_usage", args=[bad])
    wait_until(lambda: scalar("SELECT count(*) FROM usage_events") == 400, 60, "400 single events")
    wait_until(lambda: scalar("SELECT count(*) FROM dead_letters") == 1, 10, "the bad event's letter")
    received = scalar("SELECT count(DISTINCT received_at) FROM usage_events")
    assert received < 100, f"{received} transactions for 400 events: not coalesced"
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT ref, reason FROM dead_letters").fetchone() == (
            "bad-1",
            "started_at is not an RFC 3339 time: 'x'",
        )
        conn.execute("DELETE FROM dead_letters")
        conn.commit()
    assert_exact(users, events)


def test_quota_check_answers_from_redis_and_after_a_flush_from_postgres(redis_client) -> None:
    now = datetime.now(UTC)
    users = make_users(1)
    (user,) = users
    with db.transaction() as conn:
        outcome = pipeline.apply_events(conn, make_events(users, 50, now, seed=19), now)
    quota.publish(outcome.quotas.values())
    expected = outcome.quotas[str(user)]
    assert redis_client.exists(quota.KEY_PREFIX + str(user))
    assert quota.check(user) == expected
    flush_redis()
    assert quota.check(str(user).upper()) == expected  # from PostgreSQL, and cached again
    assert redis_client.exists(quota.KEY_PREFIX + str(user))
    with pytest.raises(quota.UnknownUser):
        quota.check(uuid.uuid4())


def test_a_period_that_moves_between_the_split_and_the_lock_makes_the_batch_run_again(monkeypatch) -> None:
    now = datetime.now(UTC)
    users = make_users(1)
    (user,) = users
    with db.transaction() as conn:
        pipeline.apply_events(conn, [event(user, "before", now - timedelta(hours=2), 60)], now)
    cut = now - timedelta(minutes=30)
    late = [event(user, "across-the-cut", cut - timedelta(minutes=5), 600)]
    split = pipeline._period_usage  # after the periods were read (unlocked) with the users, before the lock

    def split_then_let_stripe_cut(*args):
        usage = split(*args)
        with db.transaction() as stripe:  # another transaction moves the period and commits first
            stripe.execute(
                sa.text("UPDATE usage_periods SET period_end = :cut WHERE user_id = :u"), {"cut": cut, "u": user}
            )
            stripe.execute(
                sa.text(
                    "INSERT INTO usage_periods (user_id, period_start, period_end, plan_type, monthly_minutes_limit,"
                    " limit_ms) VALUES (:u, :cut, :end, 'premium', 3000, 180000000)"
                ),
                {"u": user, "cut": cut, "end": cut + timedelta(days=30)},
            )
        monkeypatch.setattr(pipeline, "_period_usage", split)  # once
        return usage

    monkeypatch.setattr(pipeline, "_period_usage", split_then_let_stripe_cut)
    with pytest.raises(db.StaleRead), db.transaction() as conn:
        pipeline.apply_events(conn, late, now)
    assert db.is_transient(db.StaleRead())
    with db.transaction() as conn:  # the retry splits at the new bounds
        assert pipeline.apply_events(conn, late, now).accepted == ["across-the-cut"]
    with db.engine().connect() as conn:
        used = dict(
            conn.execute(
                sa.text("SELECT period_start, used_ms FROM usage_periods WHERE user_id = :u"), {"u": user}
            ).all()
        )
    assert used.pop(cut) == 300_000  # the part after the cut is in the new period
    assert sum(used.values()) == 60_000 + 300_000
