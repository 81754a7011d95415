"""The broker's part of the Celery configuration: Redis (the embedded default) or RabbitMQ (production).

Both brokers carry the same three queues with late acknowledgement; what differs is what a crash of
the broker can cost (docs/operations.md, "What each broker guarantees"):
- RabbitMQ (`amqp://`): quorum queues, durable, replicated when the broker is a cluster; producers
  publish with confirms, so `send_task` returns only once the queue's leader and a majority of its
  replicas hold the message, and raises when the broker refused it or went away first. Messages a
  worker holds unacknowledged go back to the queue when its channel or connection closes.
- Redis (`redis://`): kombu's virtual AMQP over lists; a message a worker never acknowledged is given
  to another worker after the visibility timeout. Redis acknowledges a write before it reaches the
  disk unless it runs with `appendonly yes` and `appendfsync always`; `worker.redis_transport` makes
  taking a message and recording it as unacknowledged one step, so a crash between the two loses
  nothing.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.utils.quorum_queues import detect_quorum_queues
from kombu import Connection, Exchange, Queue

from worker.config import QUEUES, Settings

RABBITMQ_SCHEMES = ("amqp://", "amqps://")
PING_TIMEOUT = 2.0  # seconds


def is_rabbitmq(broker_url: str) -> bool:
    return broker_url.startswith(RABBITMQ_SCHEMES)


def celery_conf(config: Settings) -> dict[str, Any]:
    """The Celery settings that depend on the broker: its URL, transport, queues and their types."""
    if is_rabbitmq(config.broker_url):
        return rabbitmq_conf(config.broker_url)
    return redis_conf(config.broker_url, config.visibility_timeout)


def redis_conf(broker_url: str, visibility_timeout: int) -> dict[str, Any]:
    return {
        "broker_url": broker_url,
        "broker_transport": "worker.redis_transport:Transport",
        "broker_transport_options": redis_transport_options(visibility_timeout),
        # Each queue its own direct exchange and routing key: messages of one queue never reach another.
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
    }


def redis_transport_options(visibility_timeout: int) -> dict[str, int]:
    """Kombu's Redis options: abandoned messages are looked for every tenth of the visibility timeout
    (at most every 100 s, kombu's default), so a short timeout also means a quick redelivery. The lock
    that one sweep holds expires with the timeout too (at most kombu's 300 s), or a worker killed in the
    middle of a sweep would hold every redelivery back for five minutes."""
    sweep_every = max(1, min(100, visibility_timeout // 10))  # seconds
    interval = min(10, sweep_every)
    return {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": -(-sweep_every // interval),  # ceiling division
        "unacked_mutex_expire": max(5, min(300, visibility_timeout)),  # seconds
    }


def rabbitmq_conf(broker_url: str) -> dict[str, Any]:
    """Quorum queues (RabbitMQ 3.10 or later) and publisher confirms.

    The exchanges are topic exchanges, not direct ones: on quorum queues a countdown (every retry has
    one) waits in RabbitMQ's delayed-delivery queues, which Celery binds to topic exchanges only; on a
    direct exchange the worker would hold the message itself, taking one of its prefetch slots, which
    quorum queues do not let it raise. Channel errors (a consumer that kept a message past RabbitMQ's
    `consumer_timeout` has its channel closed) reconnect the worker rather than stop it.
    """
    return {
        "broker_url": broker_url,
        "broker_transport_options": {"confirm_publish": True},
        "task_queues": [
            Queue(
                name,
                Exchange(name, type="topic", durable=True),
                routing_key=name,
                durable=True,
                queue_arguments={"x-queue-type": "quorum"},
            )
            for name in QUEUES
        ],
        "task_default_exchange_type": "topic",
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
        "broker_channel_error_retry": True,
    }


def prefetch_is_static(app: Celery, connection: Connection) -> bool:
    """Whether the worker's prefetch count is fixed when it subscribes: on quorum queues RabbitMQ has no
    channel-wide (global) prefetch, and a new per-consumer prefetch only reaches consumers created after
    it, so Celery stops changing it (and so must anything that wanted to raise it later)."""
    return bool(app.conf.worker_detect_quorum_queues and detect_quorum_queues(app, connection.transport.driver_type)[0])


def ping(app: Celery, timeout: float = PING_TIMEOUT) -> None:
    """Raise unless the broker accepts a connection within `timeout` seconds."""
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout)
