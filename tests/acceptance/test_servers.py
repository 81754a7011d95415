"""The private servers of tests/support/servers.py: killed with SIGKILL and started again, they keep their data."""

from __future__ import annotations

import time

import amqp
import psycopg
import pytest
import redis
from support.servers import private_postgres, private_rabbitmq, private_redis


def test_private_redis_with_aof_always_keeps_every_write_across_a_kill() -> None:
    with private_redis(appendonly=True, appendfsync="always") as server:
        client = redis.Redis.from_url(server.url)
        client.lpush("work", *range(100))
        server.kill()
        server.start()
        assert client.llen("work") == 100


def test_private_postgres_recovers_committed_rows_after_a_kill_and_an_immediate_restart() -> None:
    with private_postgres() as server:
        with psycopg.connect(server.url) as conn:
            conn.execute(
                "INSERT INTO dead_letters (source, payload, reason, created_at) VALUES ('usage', '{}', 'kept', now())"
            )
        server.kill()
        server.start()
        server.restart(immediate=True)
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT reason FROM dead_letters").fetchall() == [("kept",)]


@pytest.mark.slow
def test_private_rabbitmq_keeps_confirmed_messages_of_a_quorum_queue_across_a_kill() -> None:
    with private_rabbitmq() as server:
        with amqp.Connection(f"127.0.0.1:{server.port}") as connection:
            channel = connection.channel()
            channel.queue_declare("work", durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
            for number in range(100):
                channel.basic_publish_confirm(amqp.Message(str(number), delivery_mode=2), routing_key="work")
        time.sleep(1.5)  # RabbitMQ 3.10 killed within a second of declaring a quorum queue can lose it
        server.kill()
        server.start()
        assert waiting_messages(server.port, "work") == 100


def waiting_messages(port: int, queue: str) -> int:
    """Count by taking them (unacknowledged: closing the channel puts them back), once the queue has a leader."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with amqp.Connection(f"127.0.0.1:{port}", read_timeout=5) as connection:
                channel = connection.channel()
                count = 0
                while channel.basic_get(queue) is not None:
                    count += 1
                return count
        except (amqp.exceptions.AMQPError, OSError):  # the quorum queue elects its leader after the restart
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
