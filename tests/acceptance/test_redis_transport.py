"""worker.redis_transport against kombu's own Redis transport, on a private redis-server (AOF, fsync always).

The moment that matters: Redis has handed a message to a worker and dies (or the worker does) before
the worker recorded it as unacknowledged. Stock kombu loses that message; ours had recorded it in the
same step as the pop, and delivers it again after the visibility timeout.
"""

from __future__ import annotations

import time

import pytest
import redis
from kombu import Connection, Exchange, Queue
from support.servers import private_redis

from worker.broker import redis_transport_options

STOCK = "redis"
ATOMIC = "worker.redis_transport:Transport"
QUEUE = Queue("work", Exchange("work", type="direct"), routing_key="work")
OPTIONS = redis_transport_options(visibility_timeout=1)


class WorkerDied(Exception):
    """Stands for a worker killed at this point: nothing after it runs."""


def publish(url: str, transport: str, bodies: list[dict]) -> None:
    with Connection(url, transport=transport, transport_options=OPTIONS) as connection:
        producer = connection.Producer()
        for body in bodies:
            producer.publish(body, exchange=QUEUE.exchange, routing_key="work", declare=[QUEUE])


def consume(url: str, transport: str, count: int, timeout: float) -> list[dict]:
    """Consume and acknowledge up to `count` messages, restoring abandoned ones as a worker's timer does."""
    received: list[dict] = []

    def on_message(body: dict, message) -> None:
        received.append(body)
        message.ack()

    with (
        Connection(url, transport=transport, transport_options=OPTIONS) as connection,
        connection.Consumer(QUEUE, callbacks=[on_message], accept=["json"]),
    ):
        deadline = time.monotonic() + timeout
        while len(received) < count and time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=0.5)
            except TimeoutError:
                connection.default_channel.qos.restore_visible(num=100, interval=1)
    return received


@pytest.mark.parametrize(("transport", "survives"), [(STOCK, False), (ATOMIC, True)])
def test_a_message_in_flight_when_redis_dies_is_lost_by_stock_kombu_and_delivered_again_by_ours(
    transport: str, survives: bool
) -> None:
    with private_redis(appendonly=True, appendfsync="always") as server:
        publish(server.url, transport, [{"n": 1}])
        with Connection(server.url, transport=transport, transport_options=OPTIONS) as connection:

            def redis_dies_now(message: dict, queue: str) -> None:  # the pop's reply is in, nothing else ran
                server.kill()
                raise WorkerDied

            connection.transport._deliver = redis_dies_now
            with connection.Consumer(QUEUE, callbacks=[], accept=["json"]), pytest.raises(WorkerDied):
                connection.drain_events(timeout=10)
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.llen("work") == 0  # the pop itself was durable
        assert client.hlen("unacked") == (1 if survives else 0)
        assert consume(server.url, ATOMIC, count=1, timeout=5) == ([{"n": 1}] if survives else [])


@pytest.mark.parametrize("transport", [STOCK, ATOMIC])
def test_acknowledged_messages_leave_nothing_to_redeliver(transport: str) -> None:
    with private_redis(appendonly=False) as server:
        bodies = [{"n": n} for n in range(20)]
        publish(server.url, transport, bodies)
        assert sorted(consume(server.url, transport, count=20, timeout=10), key=lambda body: body["n"]) == bodies
        client = redis.Redis.from_url(server.url)
        assert (client.llen("work"), client.hlen("unacked"), client.zcard("unacked_index")) == (0, 0, 0)
