"""Worker heartbeats: a real `celery worker` is counted while it lives, and not once it is gone."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.http_server import free_port

from worker import health, liveness


def live_gauges() -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in health.LiveCollector().collect()
        for sample in family.samples
    }


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_worker_is_counted_while_alive_and_not_once_killed(spawn_worker, redis_client) -> None:
    queue = f"probe-{uuid.uuid4().hex[:8]}"  # consumed by this worker only, whatever else runs
    worker = spawn_worker(concurrency=1, queues=queue)
    name = f"{worker.hostname}:{worker.process.pid}"
    consumers = ("worldspeak_queue_workers", frozenset({("queue", queue)}))

    wait_until(lambda: liveness.alive_workers(redis_client).get(name) == [queue], "the worker's heartbeat")
    gauges = live_gauges()
    assert gauges[consumers] == 1
    assert gauges[("worldspeak_workers_alive", frozenset())] >= 1
    assert ("worldspeak_queue_workers", frozenset({("queue", "usage")})) in gauges  # the app's queues, always

    worker.kill()  # SIGKILL: nothing gets to withdraw the heartbeat; it expires
    wait_until(lambda: name not in liveness.alive_workers(redis_client), "the heartbeat's expiry")
    assert consumers not in live_gauges()
    assert name not in redis_client.smembers(liveness.WORKERS_KEY)  # forgotten, not only expired


@pytest.mark.slow
def test_a_worker_that_stops_cleanly_withdraws_its_heartbeat_before_it_exits(spawn_worker, redis_client) -> None:
    worker = spawn_worker(concurrency=1, queues=f"probe-{uuid.uuid4().hex[:8]}")
    name = f"{worker.hostname}:{worker.process.pid}"
    wait_until(lambda: name in liveness.alive_workers(redis_client), "the worker's heartbeat")
    worker.stop()  # SIGTERM: a warm shutdown, waited for
    assert worker.process.returncode == 0
    assert redis_client.get(liveness.HEARTBEAT_PREFIX + name) is None
    assert name not in liveness.alive_workers(redis_client)


class PrivateRedis:
    """A redis-server of the test's own on a free port, without persistence: a restart empties it."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.servers: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        server = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.servers.append(server)
        wait_until(lambda: _answers(redis_lib.Redis(port=self.port)), "the private Redis", timeout=20)
        return server

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


def _answers(client: redis_lib.Redis) -> bool:
    try:
        return client.ping()
    except redis_lib.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    instance = PrivateRedis(tmp_path)
    yield instance
    for server in instance.servers:
        server.kill()
        server.wait()


def test_the_heartbeat_outlives_a_redis_outage_and_resumes(private_redis, monkeypatch) -> None:
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 0.05)
    client = private_redis.client()
    server = private_redis.start()
    heartbeat = liveness.Heartbeat("probe@host:1", ["usage"], client=lambda: client)
    heartbeat.start()
    try:
        wait_until(lambda: liveness.alive_workers(client) == {"probe@host:1": ["usage"]}, "a heartbeat")
        server.kill()
        server.wait()
        time.sleep(0.5)  # several beats fail meanwhile
        assert heartbeat._thread.is_alive()
        private_redis.start()  # empty: it kept nothing
        wait_until(lambda: liveness.alive_workers(client) == {"probe@host:1": ["usage"]}, "the heartbeat again")
    finally:
        heartbeat.stop()
    assert not heartbeat._thread.is_alive()
    assert liveness.alive_workers(client) == {}


def test_stopping_a_heartbeat_while_redis_is_down_does_not_raise() -> None:
    no_retries = Retry(NoBackoff(), 0)  # redis-py retries a refused connection by default: seconds, here for nothing
    client = redis_lib.Redis(port=free_port(), socket_timeout=1, socket_connect_timeout=1, retry=no_retries)
    heartbeat = liveness.Heartbeat("probe@host:2", ["usage"], client=lambda: client)
    heartbeat.start()
    heartbeat.stop()
    assert not heartbeat._thread.is_alive()
