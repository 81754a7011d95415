"""Scrape-time gauges: queue depths from either broker, lock waits, and what a scrape shows with a dependency down."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import kombu
import psycopg
import pytest
from kombu.exceptions import OperationalError
from prometheus_client.parser import text_string_to_metric_families
from support.http_server import black_hole, free_port, serve_in_subprocess
from support.run import REDIS_BASE, RUN_ID, TEST_ENV
from support.servers import shared_rabbitmq_vhost

from bench.harness import claim_redis_db, release_redis
from worker import db, health

Samples = dict[tuple[str, frozenset], float]


def samples_of(families) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def depths(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["queue"]: value for (name, labels), value in samples.items() if name == "worldspeak_queue_messages"
    }


def app_queue(name: str, **queue_arguments: str) -> kombu.Queue:
    """A queue as the app declares it (its own direct exchange and routing key)."""
    return kombu.Queue(name, kombu.Exchange(name, type="direct"), routing_key=name, queue_arguments=queue_arguments)


def publish(connection: kombu.Connection, queue: kombu.Queue, count: int) -> None:
    producer = connection.Producer()
    for number in range(count):
        producer.publish({"n": number}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue])


@pytest.fixture
def redis_broker_url() -> Iterator[str]:
    """A Redis database of its own, standing for the broker: nothing consumes from it."""
    url = f"{REDIS_BASE}/{claim_redis_db(f'{RUN_ID}-broker', numbers=range(1, 16), base_url=REDIS_BASE)}"
    yield url
    release_redis(url)


@pytest.fixture(scope="module")
def rabbitmq_url() -> Iterator[str]:
    """A RabbitMQ vhost of this module on the machine's broker, deleted afterwards (never the default one)."""
    with shared_rabbitmq_vhost(f"ws_test_{RUN_ID}_metrics") as url:
        yield url


def test_queue_depths_and_unacked_messages_come_from_a_redis_broker(redis_broker_url: str) -> None:
    with kombu.Connection(redis_broker_url) as connection:
        usage = app_queue("usage")
        publish(connection, usage, 3)
        delivered = usage(connection.default_channel).get(no_ack=False)  # delivered, not acknowledged
        assert delivered is not None
        samples = samples_of(health.LiveCollector._from_broker(redis_broker_url))
        delivered.ack()
    assert depths(samples) == {"usage": 2, "stripe": 0, "maintenance": 0}  # stripe and maintenance never existed
    assert samples[("worldspeak_queue_unacked_messages", frozenset())] == 1


def test_queue_depths_come_from_rabbitmq_quorum_queues(rabbitmq_url: str) -> None:
    with kombu.Connection(rabbitmq_url) as connection:
        usage, stripe = (app_queue(name, **{"x-queue-type": "quorum"}) for name in ("usage", "stripe"))
        publish(connection, usage, 3)
        stripe(connection.default_channel).declare()
        delivered = usage(connection.default_channel).get(no_ack=False)
        assert delivered is not None
        samples = samples_of(health.LiveCollector._from_broker(rabbitmq_url))
        delivered.ack()
    # ready messages only (the one delivered is not); maintenance was never declared in this vhost
    assert depths(samples) == {"usage": 2, "stripe": 0, "maintenance": 0}
    assert not any(name == "worldspeak_queue_unacked_messages" for name, _ in samples)  # AMQP does not tell


def bounded(function, limit: float = 60):
    """Run `function` in a thread; its result, or a failure if it is still running after `limit` seconds."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(function())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert outcome, f"still waiting after {limit} s: unbounded"
    return outcome[0]


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_broker_that_is_down_or_hung_fails_the_read_quickly(scheme: str) -> None:
    def read(port: int) -> object:
        url = f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"amqp://guest:guest@127.0.0.1:{port}//"
        return bounded(lambda: list(health.LiveCollector._from_broker(url)))

    assert isinstance(read(free_port()), OperationalError)  # nothing listens
    with black_hole() as hung:
        assert isinstance(read(hung), OperationalError)  # accepts, never answers


def test_a_scrape_with_redis_down_says_so_and_still_reports_postgresql() -> None:
    with serve_in_subprocess(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") as url:  # the broker too, here
        response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    scraped = samples_of(text_string_to_metric_families(response.text))
    up = {dict(labels)["dependency"]: value for (name, labels), value in scraped.items() if name.endswith("_up")}
    assert up == {"redis": 0, "broker": 0, "postgresql": 1}
    assert ("worldspeak_postgresql_sessions_waiting_on_locks", frozenset()) in scraped
    assert not any(name in ("worldspeak_workers_alive", "worldspeak_queue_messages") for name, _ in scraped)


LOCK_KEY = 0x77734C4B  # an advisory lock of this test only


def lock_gauges() -> Samples:
    with db.engine().connect() as conn:
        return samples_of(health.LiveCollector._lock_waits(conn))


def gauge(samples: Samples, name: str) -> float:
    return samples[(f"worldspeak_postgresql_{name}", frozenset())]


def test_lock_waits_and_idle_transactions_of_the_database_are_reported(monkeypatch) -> None:
    url = TEST_ENV["DATABASE_URL"]
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as waiter:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))  # then idle, inside its transaction
        blocked = threading.Thread(target=waiter.execute, args=("SELECT pg_advisory_lock(%s)", (LOCK_KEY,)))
        blocked.start()
        try:
            deadline = time.monotonic() + 30
            while gauge(samples := lock_gauges(), "sessions_waiting_on_locks") != 1:
                assert time.monotonic() < deadline, "the waiting session was never seen"
                time.sleep(0.05)
            assert gauge(samples, "longest_lock_wait_seconds") > 0
            monkeypatch.setattr(health, "IDLE_IN_TRANSACTION_SECONDS", 0)
            assert gauge(lock_gauges(), "sessions_idle_in_transaction") == 1  # the holder, not the waiter
            monkeypatch.setattr(health, "IDLE_IN_TRANSACTION_SECONDS", 3600)
            assert gauge(lock_gauges(), "sessions_idle_in_transaction") == 0  # not idle that long
        finally:  # the waiter's connection cannot close while its thread waits for the lock
            holder.rollback()
            blocked.join(30)
        assert not blocked.is_alive()
        waiter.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    after = lock_gauges()
    assert (gauge(after, "sessions_waiting_on_locks"), gauge(after, "longest_lock_wait_seconds")) == (0, 0)
