"""What the system looks like from outside: the readiness checks of `GET /readyz`, and the gauges read at
scrape time for `GET /metrics` beside the counters every process writes (worker.metrics).

What is truer read at scrape time than counted is read at scrape time: queue depths (the broker, Redis
or RabbitMQ alike), the workers alive (their heartbeats in Redis), how long ago each beat job last
succeeded, how many dead letters wait and which sessions wait on locks (PostgreSQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import kombu
import redis
import sqlalchemy as sa
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.engine import Connection

from worker import broker, db, liveness, metrics
from worker.cache import redis_client
from worker.celery import app
from worker.config import QUEUES, settings
from worker.logs import get_logger
from worker.tables import dead_letters, maintenance_runs

log = get_logger(__name__)

SCRAPE_STATEMENT_TIMEOUT_MS = 2000
BROKER_SCRAPE_TIMEOUT = 2  # seconds for each connect, read and write of the broker during a scrape
IDLE_IN_TRANSACTION_SECONDS = 5  # a session idle this long inside a transaction is reported
READINESS_TIMEOUT = 2.0  # seconds for each dependency check


# -- readiness ---------------------------------------------------------------------------------------------


def _check_postgres() -> None:
    with db.engine().connect() as conn:
        conn.execute(sa.text("SET LOCAL statement_timeout = 2000"))
        conn.execute(sa.text("SELECT 1"))


def _check_redis() -> None:
    redis_client().ping()


def _check_broker() -> None:
    broker.ping(app, timeout=READINESS_TIMEOUT)


def checks() -> dict[str, Callable[[], None]]:
    """What must answer for the web to be ready: PostgreSQL, Redis, and the broker when it is not that Redis."""
    found = {"postgresql": _check_postgres, "redis": _check_redis}
    if settings().broker_url != settings().redis_url:
        found["broker"] = _check_broker
    return found


async def unavailable() -> dict[str, str]:
    """Each dependency that does not answer within READINESS_TIMEOUT, with why."""
    dependencies = checks()
    results = await asyncio.gather(
        *(asyncio.wait_for(asyncio.to_thread(check), READINESS_TIMEOUT) for check in dependencies.values()),
        return_exceptions=True,
    )
    return {name: _why_down(result) for name, result in zip(dependencies, results, strict=True) if result is not None}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _why_down(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {READINESS_TIMEOUT} s"
    return f"{type(exc).__name__}: {first_line(exc)}"


# -- scrape-time gauges ------------------------------------------------------------------------------------


# Sessions of this database waiting on a lock, the longest current wait (pg_locks.waitstart), and sessions
# idle inside a transaction for longer than :idle_seconds (holding whatever locks they took meanwhile).
LOCK_WAITS = sa.text("""
    SELECT count(*) FILTER (WHERE activity.wait_event_type = 'Lock'),
           coalesce(extract(epoch FROM clock_timestamp() - min(waits.waitstart)), 0),
           count(*) FILTER (WHERE activity.state IN ('idle in transaction', 'idle in transaction (aborted)')
                              AND activity.state_change < clock_timestamp() - make_interval(secs => :idle_seconds))
    FROM pg_stat_activity AS activity
    LEFT JOIN (SELECT pid, min(waitstart) AS waitstart FROM pg_locks WHERE NOT granted GROUP BY pid) AS waits
        USING (pid)
    WHERE activity.datname = current_database() AND activity.pid <> pg_backend_pid()
""")


class LiveCollector:
    """Gauges read at scrape time from Redis, the broker and PostgreSQL; a dependency that is down shows as up=0."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "worldspeak_dependency_up", "1 when the scrape could read it, else 0.", labels=["dependency"]
        )
        sources = (
            ("redis", self._from_redis, redis.RedisError),
            ("broker", self._from_broker, OperationalError),
            ("postgresql", self._from_postgresql, sa.exc.SQLAlchemyError),
        )
        for dependency, read, errors in sources:
            try:
                yield from read()
                up.add_metric([dependency], 1)
            except errors as exc:
                log.warning(f"metrics_{dependency}_unavailable", error=first_line(exc))
                up.add_metric([dependency], 0)
        yield up

    @staticmethod
    def _from_redis() -> Iterator[Metric]:
        """From the workers' heartbeats in the quota cache's Redis (worker.liveness), whatever the broker is:
        how many live, and how many consume each queue."""
        alive = liveness.alive_workers(redis_client())
        yield GaugeMetricFamily("worldspeak_workers_alive", "Celery workers whose heartbeat is fresh.", len(alive))
        consuming = GaugeMetricFamily(
            "worldspeak_queue_workers", "Celery workers alive consuming each queue.", labels=["queue"]
        )
        for queue in sorted(set(QUEUES).union(*alive.values())):
            consuming.add_metric([queue], sum(queue in queues for queues in alive.values()))
        yield consuming

    @staticmethod
    def _from_broker(url: str | None = None) -> Iterator[Metric]:
        """Queue depths asked of the broker itself (the app's, unless `url` names another), so they are right
        whichever broker it is; every round trip bounded (each transport reads the options it knows)."""
        timeouts = {"socket_timeout": BROKER_SCRAPE_TIMEOUT, "socket_connect_timeout": BROKER_SCRAPE_TIMEOUT}
        timeouts |= {"read_timeout": BROKER_SCRAPE_TIMEOUT, "write_timeout": BROKER_SCRAPE_TIMEOUT}
        options: dict[str, Any] = {"connect_timeout": BROKER_SCRAPE_TIMEOUT, "transport_options": timeouts}
        # Another broker than the app's speaks its own transport, not the one the app configured for its own.
        connection = app.connection_for_read(**options) if url is None else kombu.Connection(url, **options)
        with connection:
            try:
                connection.ensure_connection(max_retries=0)
                depths = {queue: _ready_messages(connection, queue) for queue in QUEUES}
                unacked = _unacked_messages(connection)
            except (*connection.connection_errors, *connection.channel_errors) as exc:
                raise OperationalError(first_line(exc)) from exc
        waiting = GaugeMetricFamily(
            "worldspeak_queue_messages", "Messages ready in each queue (not yet delivered).", labels=["queue"]
        )
        for queue, depth in depths.items():
            waiting.add_metric([queue], depth)
        yield waiting
        if unacked is not None:
            yield GaugeMetricFamily(
                "worldspeak_queue_unacked_messages", "Messages delivered to workers and not yet acknowledged.", unacked
            )

    @staticmethod
    def _from_postgresql() -> Iterator[Metric]:
        with db.engine().connect() as conn:
            conn.execute(sa.text(f"SET LOCAL statement_timeout = {SCRAPE_STATEMENT_TIMEOUT_MS}"))
            runs = conn.execute(sa.select(maintenance_runs.c.job, maintenance_runs.c.last_succeeded_at)).all()
            pending = conn.execute(
                sa.select(dead_letters.c.source, sa.func.count())
                .where(dead_letters.c.replayed_at.is_(None))
                .group_by(dead_letters.c.source)
            ).all()
            lock_waits = list(LiveCollector._lock_waits(conn))
        now = datetime.now(UTC)
        schedule = settings().schedule
        succeeded = {job: None for job in schedule} | dict(runs)
        # "beat_job", not "job": Prometheus gives every scraped series the label job (its scrape job) and
        # would rename ours exported_job.
        staleness = GaugeMetricFamily(
            "worldspeak_beat_job_seconds_since_success",
            "Seconds since each periodic job last succeeded (+Inf: it never has).",
            labels=["beat_job"],
        )
        for job, succeeded_at in sorted(succeeded.items()):
            staleness.add_metric([job], (now - succeeded_at).total_seconds() if succeeded_at else float("inf"))
        yield staleness
        interval = GaugeMetricFamily(
            "worldspeak_beat_job_interval_seconds",
            "Configured seconds between runs of each periodic job.",
            labels=["beat_job"],
        )
        for job, seconds in sorted(schedule.items()):
            interval.add_metric([job], seconds)
        yield interval
        letters = GaugeMetricFamily(
            "worldspeak_dead_letters_pending", "Dead letters not yet replayed, by source.", labels=["source"]
        )
        for source, count in (dict.fromkeys(metrics.DEAD_LETTER_SOURCES, 0) | dict(pending)).items():
            letters.add_metric([source], count)
        yield letters
        yield from lock_waits

    @staticmethod
    def _lock_waits(conn: Connection) -> Iterator[Metric]:
        """Lock waits in the worker's own database, read in the caller's guarded transaction."""
        waiting, longest, idle = conn.execute(LOCK_WAITS, {"idle_seconds": IDLE_IN_TRANSACTION_SECONDS}).one()
        yield GaugeMetricFamily(
            "worldspeak_postgresql_sessions_waiting_on_locks", "Sessions of the database waiting on a lock.", waiting
        )
        yield GaugeMetricFamily(
            "worldspeak_postgresql_longest_lock_wait_seconds",
            "Seconds the longest current lock wait has lasted (0: none waits).",
            float(longest),
        )
        yield GaugeMetricFamily(
            "worldspeak_postgresql_sessions_idle_in_transaction",
            f"Sessions of the database idle inside a transaction for more than {IDLE_IN_TRANSACTION_SECONDS} s.",
            idle,
        )


def _ready_messages(connection: kombu.Connection, queue: str) -> int:
    """Messages ready in one queue, from a passive declare; a queue the broker does not know holds none (on
    Redis an empty queue does not exist). A channel of its own: AMQP closes one that named a missing queue."""
    with connection.channel() as channel:
        try:
            return channel.queue_declare(queue, passive=True).message_count
        except connection.channel_errors as exc:
            if str(getattr(exc, "reply_code", "")) == "404":  # py-amqp says 404, kombu's Redis transport "404"
                return 0
            raise


def _unacked_messages(connection: kombu.Connection) -> int | None:
    """kombu's Redis transport keeps messages delivered and not yet acknowledged in one hash; AMQP tells no
    client (RabbitMQ's own metrics have them), so None there."""
    if connection.transport.driver_type != "redis":
        return None
    channel: Any = connection.default_channel  # kombu's Redis channel: its client and the unacked hash
    with channel.conn_or_acquire() as client:
        return client.hlen(channel.unacked_key)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every process on this host plus the scrape-time gauges, and its content type."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics.directory())
    registry.register(LiveCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
