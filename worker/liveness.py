"""Which Celery workers are alive, told through the quota cache's Redis whatever the broker is.

The main process of every `celery worker` writes a heartbeat every HEARTBEAT_SECONDS: a key holding the
queues it consumes, expiring after HEARTBEAT_TTL_SECONDS, and its name in a set of workers. A worker
killed with SIGKILL stops writing and its key expires; one that stops cleanly deletes it at once. Redis's
own expiry decides, so the hosts' clocks need not agree. The heartbeat runs in a thread of its own, so a
hung Redis never stalls the worker's event loop, and a Redis that is down only logs a warning.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence

import redis
from celery import bootsteps

from worker.cache import redis_client
from worker.logs import get_logger

log = get_logger(__name__)

WORKERS_KEY = "workers"  # the set of worker names that have written a heartbeat
HEARTBEAT_PREFIX = "worker:"  # + name: the queues that worker consumes, while it lives
HEARTBEAT_SECONDS = 5
HEARTBEAT_TTL_SECONDS = 15  # three heartbeats: one slow Redis round trip never makes a worker look dead


def beat(name: str, queues: Sequence[str], client: redis.Redis) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.set(HEARTBEAT_PREFIX + name, json.dumps(sorted(queues)), ex=HEARTBEAT_TTL_SECONDS)
        pipe.sadd(WORKERS_KEY, name)
        pipe.execute()


def withdraw(name: str, client: redis.Redis) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(HEARTBEAT_PREFIX + name)
        pipe.srem(WORKERS_KEY, name)
        pipe.execute()


def alive_workers(client: redis.Redis) -> dict[str, list[str]]:
    """Each worker with a fresh heartbeat and the queues it consumes; names whose heartbeat expired are
    forgotten on the way."""
    names = sorted(str(name) for name in client.smembers(WORKERS_KEY))  # a client that decodes responses
    heartbeats = client.mget([HEARTBEAT_PREFIX + name for name in names]) if names else []
    expired = [name for name, heartbeat in zip(names, heartbeats, strict=True) if heartbeat is None]
    if expired:
        client.srem(WORKERS_KEY, *expired)
    return {name: json.loads(heartbeat) for name, heartbeat in zip(names, heartbeats, strict=True) if heartbeat}


class Heartbeat:
    """A thread writing one worker's heartbeat until it is stopped."""

    def __init__(self, name: str, queues: Sequence[str], client: Callable[[], redis.Redis] = redis_client) -> None:
        self.name = name
        self.queues = list(queues)
        self._client = client
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worldspeak-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=HEARTBEAT_TTL_SECONDS)
        try:
            withdraw(self.name, self._client())
        except redis.RedisError as exc:  # the key expires by itself
            log.warning("worker_heartbeat_not_withdrawn", worker=self.name, error=str(exc))

    def _run(self) -> None:
        failing = False
        while True:
            try:
                beat(self.name, self.queues, self._client())
                if failing:
                    log.info("worker_heartbeat_resumed", worker=self.name)
                failing = False
            except redis.RedisError as exc:
                if not failing:  # once per outage, not every few seconds
                    log.warning("worker_heartbeat_failing", worker=self.name, error=str(exc))
                failing = True
            if self._stopped.wait(HEARTBEAT_SECONDS):
                return


class HeartbeatStep(bootsteps.StartStopStep):
    """The heartbeat as a step of the worker's main process, started once its pool is up (so the pool's
    first children are forked before the thread exists) and stopped when the worker shuts down."""

    requires = ("celery.worker.components:Pool",)

    def create(self, worker: object) -> Heartbeat:
        queues = worker.app.amqp.queues.consume_from or worker.app.amqp.queues  # type: ignore[attr-defined]
        return Heartbeat(f"{worker.hostname}:{os.getpid()}", sorted(queues))  # type: ignore[attr-defined]
