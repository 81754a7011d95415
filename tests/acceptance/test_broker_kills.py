"""The broker SIGKILLed and restarted mid-stream while worker processes consume (private brokers, slow).

Producers resend every send that raised (tests/support/kill_streams.py). Redis runs as it must to lose
nothing it acknowledged (`appendonly yes`, `appendfsync always`, with worker.redis_transport), RabbitMQ
with quorum queues and publisher confirms. Both paths: batches and single events. Every event whose send
returned is in the ledger once, and the totals are exact.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis
from support.checks import assert_exact
from support.factories import make_events, make_users
from support.kill_streams import mixed_units, single_units, stream_through_kills
from support.run import TEST_ENV
from support.servers import private_rabbitmq, private_redis
from support.workers import producer_app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("committed")]

KILLS = 3
EVENTS = 6_000


@contextmanager
def private_broker(kind: str) -> Iterator[Any]:
    if kind == "redis":
        with private_redis(appendonly=True, appendfsync="always") as server:
            yield server
    else:
        with private_rabbitmq() as server:
            yield server


def ledger_ids() -> set[str]:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return {row[0] for row in conn.execute("SELECT event_id FROM usage_events")}


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_every_event_whose_send_returned_is_counted_once_across_broker_kills(kind: str, spawn_worker) -> None:
    users = make_users(20)
    events = make_events(users, EVENTS, datetime.now(UTC), seed=37)
    with private_broker(kind) as server, producer_app(server.url) as producer:
        env = {"CELERY_BROKER_URL": server.url, "CELERY_VISIBILITY_TIMEOUT": "5"}
        workers = [spawn_worker(concurrency=1, env=env) for _ in range(2)]
        result = stream_through_kills(producer, server, mixed_units(events), KILLS, ledger_ids, settle=60)
        for worker in workers:
            worker.stop()
    assert result.lost("metering.record_usage_batch") == []
    assert result.lost("metering.record_usage") == []
    assert all(in_flight > 0 for in_flight in result.in_flight_at_kills), "a kill found nothing in flight"
    assert_exact(users, events)


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_single_events_still_flush_on_time_after_the_broker_came_back(kind: str, spawn_worker) -> None:
    """Celery empties a consumer's timer when its connection drops; without a flush timer of its own, the
    coalescer would hold a partial batch until 1,000 more events came (Redis: an hour's visibility here)."""
    users = make_users(5)
    events = make_events(users, 1_500, datetime.now(UTC), seed=41)
    with private_broker(kind) as server, producer_app(server.url) as producer:
        worker = spawn_worker(concurrency=1, env={"CELERY_BROKER_URL": server.url})
        result = stream_through_kills(producer, server, single_units(events), 1, ledger_ids, settle=30)
        worker.stop()
        held = held_unacknowledged(server.url) if kind == "redis" else set()
    # On Redis a message the worker held when Redis died is recorded as unacknowledged and comes back after
    # the visibility timeout (an hour here): late, not lost. Anything else missing is lost.
    assert set(result.lost("metering.record_usage")) <= held
    assert_exact(users, [event for event in events if event["event_id"] not in held])


def held_unacknowledged(redis_url: str) -> set[str]:
    """The event ids of the messages kombu's Redis transport holds as delivered and not acknowledged."""
    client = redis.Redis.from_url(redis_url)
    held = set()
    for raw in client.hvals("unacked"):
        message, _exchange, _routing_key = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        held.update(item["event_id"] for item in (args[0] if args and isinstance(args[0], list) else args[:1]))
    return held
