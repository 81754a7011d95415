"""What each broker must do for the worker, on the real brokers: Redis (this run's database) and
RabbitMQ (this run's vhost): control commands, coalescing, retries with a countdown, beat, queue types."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from support.checks import assert_exact, scalar, wait_until
from support.factories import insert_user, make_events, make_users
from support.http_server import free_port, serve_in_subprocess
from support.run import ROOT, TEST_ENV
from support.servers import private_postgres, shared_rabbitmqctl
from support.workers import Broker, purge_queues

from worker.config import QUEUES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("committed")]


def test_celery_inspect_ping_answers_on_each_broker(spawn_worker, broker: Broker) -> None:
    worker = spawn_worker(concurrency=1, env=broker.env)
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "inspect", "ping", "-d", worker.hostname, "--timeout", "10"],
        cwd=ROOT,
        env={**os.environ, **broker.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pong" in done.stdout
    if broker.name == "redis":  # the reply was consumed without acknowledgement: nothing left to redeliver
        assert redis.Redis.from_url(TEST_ENV["REDIS_URL"]).hlen("unacked") == 0


def listing(*arguments: str) -> list[dict[str, str]]:
    """A rabbitmqctl listing as rows of column name -> value."""
    header, *rows = shared_rabbitmqctl(*arguments, "--quiet").strip().splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"), strict=True)) for row in rows]


def test_rabbitmq_queues_are_durable_quorum_queues_and_control_queues_stay_classic(
    spawn_worker, rabbitmq_url: str
) -> None:
    vhost = rabbitmq_url.rsplit("/", 1)[1]
    worker = spawn_worker(concurrency=2, env={"CELERY_BROKER_URL": rabbitmq_url})
    queues = {row["name"]: row for row in listing("list_queues", "-p", vhost, "name", "type", "durable", "auto_delete")}
    for name in QUEUES:
        assert (queues[name]["type"], queues[name]["durable"], queues[name]["auto_delete"]) == (
            "quorum",
            "true",
            "false",
        )
    pidbox = queues[f"{worker.hostname}.celery.pidbox"]  # broadcast commands: per worker, gone with it
    assert (pidbox["type"], pidbox["auto_delete"]) == ("classic", "true")
    # Celery's delayed delivery, where countdowns wait: quorum queues too, 28 levels of powers of two seconds
    assert sum(1 for row in queues.values() if row["name"].startswith("celery_delayed_")) == 28
    # The prefetch is fixed at subscription: the single-event batcher's whole batch fits in it
    prefetch = {row["queue_name"]: int(row["prefetch_count"]) for row in listing("list_consumers", "-p", vhost)}
    assert prefetch["usage"] >= 1000


def test_single_events_coalesce_into_few_transactions_on_each_broker(spawn_worker, broker: Broker) -> None:
    now = datetime.now(UTC)
    users = make_users(2)
    events = make_events(users, 400, now, seed=23)
    for item in events:
        broker.app.send_task("metering.record_usage", args=[item])
    spawn_worker(concurrency=2, env={**broker.env, "USAGE_FLUSH_EVERY": "200"})
    wait_until(lambda: scalar("SELECT count(*) FROM usage_events") == 400, 60, "400 single events")
    # a prefetch stuck at the worker's own (2 processes x 4) would flush at most 8 events at a time: 50 or more
    transactions = scalar("SELECT count(DISTINCT received_at) FROM usage_events")
    assert transactions < 40, f"{transactions} transactions for 400 events: the batches did not fill"
    assert_exact(users, events)


def test_a_task_retried_with_a_countdown_runs_again_on_each_broker(spawn_worker, broker: Broker) -> None:
    with private_postgres() as database:
        with psycopg.connect(database.url) as conn:
            users = {insert_user(conn): "UTC" for _ in range(2)}
        events = make_events(users, 50, datetime.now(UTC), seed=29)
        worker = spawn_worker(concurrency=1, env={**broker.env, "DATABASE_URL": database.url})
        database.stop()  # the batch fails on a lost connection: retried with a countdown
        broker.app.send_task("metering.record_usage_batch", args=[events])
        wait_until(lambda: "task_retry" in worker.log_path.read_text(), 30, "the first attempt to fail")
        database.start()
        wait_until(lambda: ledger_rows(database.url) == 50, 60, "the retried batch")
        log = worker.log_path.read_text()
        assert "Direct exchanges are not supported" not in log  # the countdown waited in the broker
        with psycopg.connect(database.url) as conn:
            assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def ledger_rows(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM usage_events").fetchone()[0]


def test_beat_publishes_its_jobs_to_rabbitmq(tmp_path: Path, rabbitmq_app, rabbitmq_url: str) -> None:
    purge_queues(rabbitmq_app)
    env = {**os.environ, "CELERY_BROKER_URL": rabbitmq_url, "SCHEDULE_SWEEP_SECONDS": "1"}
    command = [sys.executable, "-m", "celery", "-A", "worker", "beat", "-s", str(tmp_path / "schedule")]
    beat = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sent: set[str] = set()

    def sweep_sent() -> bool:
        sent.update(take_task_names(rabbitmq_app, "maintenance"))
        return "maintenance.sweep" in sent

    try:
        wait_until(sweep_sent, 60, "beat to send maintenance.sweep")
    finally:
        beat.terminate()
        beat.wait(timeout=30)


def take_task_names(app, queue_name: str) -> set[str]:
    """Take every message waiting in a queue; the names of their tasks."""
    names = set()
    with app.connection_for_write() as connection:
        (queue,) = [queue for queue in app.conf.task_queues if queue.name == queue_name]
        bound = queue(connection.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            names.add(message.headers["task"])
    return names


def test_readyz_checks_a_rabbitmq_broker(rabbitmq_url: str) -> None:
    with serve_in_subprocess(CELERY_BROKER_URL=rabbitmq_url) as url:
        assert httpx.get(f"{url}/readyz", timeout=15).json() == {"status": "ready"}
    with serve_in_subprocess(CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//") as url:
        response = httpx.get(f"{url}/readyz", timeout=15)
    assert response.status_code == 503
    assert list(response.json()["down"]) == ["broker"]


def test_metrics_count_the_messages_waiting_in_rabbitmq(rabbitmq_app, rabbitmq_url: str) -> None:
    purge_queues(rabbitmq_app)
    for _ in range(3):
        rabbitmq_app.send_task("maintenance.sweep")
    with serve_in_subprocess(CELERY_BROKER_URL=rabbitmq_url) as url:
        scrape = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'worldspeak_queue_messages{queue="maintenance"} 3.0' in scrape
    assert 'worldspeak_queue_messages{queue="usage"} 0.0' in scrape
    assert 'worldspeak_dependency_up{dependency="broker"} 1.0' in scrape
    purge_queues(rabbitmq_app)
