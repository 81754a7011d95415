"""What the system looks like from outside: the readiness checks of `GET /readyz`, and the gauges read at
scrape time for `GET /metrics` (queue depths from Redis; beat staleness and dead letters waiting from
PostgreSQL) beside the counters every process writes (worker.metrics).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import redis
import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from worker import db, metrics
from worker.cache import redis_client
from worker.config import QUEUES, settings
from worker.logs import get_logger
from worker.tables import dead_letters, maintenance_runs

log = get_logger(__name__)

UNACKED_KEY = "unacked"  # kombu's hash of messages delivered to a worker and not yet acknowledged
SCRAPE_STATEMENT_TIMEOUT_MS = 2000
READINESS_TIMEOUT = 2.0  # seconds for each dependency check


# -- readiness ---------------------------------------------------------------------------------------------


def _check_postgres() -> None:
    with db.engine().connect() as conn:
        conn.execute(sa.text("SET LOCAL statement_timeout = 2000"))
        conn.execute(sa.text("SELECT 1"))


def _check_redis() -> None:
    redis_client().ping()


CHECKS: dict[str, Callable[[], None]] = {"postgresql": _check_postgres, "redis": _check_redis}


async def unavailable() -> dict[str, str]:
    """Each dependency that does not answer within READINESS_TIMEOUT, with why."""
    results = await asyncio.gather(
        *(asyncio.wait_for(asyncio.to_thread(check), READINESS_TIMEOUT) for check in CHECKS.values()),
        return_exceptions=True,
    )
    return {name: _why_down(result) for name, result in zip(CHECKS, results, strict=True) if result is not None}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _why_down(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {READINESS_TIMEOUT} s"
    return f"{type(exc).__name__}: {first_line(exc)}"


# -- scrape-time gauges ------------------------------------------------------------------------------------


class LiveCollector:
    """Gauges read at scrape time from Redis and PostgreSQL; a dependency that is down shows as up=0."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "worldspeak_dependency_up", "1 when the scrape could read it, else 0.", labels=["dependency"]
        )
        try:
            yield from self._from_redis()
            up.add_metric(["redis"], 1)
        except redis.RedisError as exc:
            log.warning("metrics_redis_unavailable", error=str(exc))
            up.add_metric(["redis"], 0)
        try:
            yield from self._from_postgresql()
            up.add_metric(["postgresql"], 1)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics_postgresql_unavailable", error=str(exc).splitlines()[0])
            up.add_metric(["postgresql"], 0)
        yield up

    @staticmethod
    def _from_redis() -> Iterator[Metric]:
        # kombu keeps each queue as a Redis list named after it
        with redis_client().pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.llen(queue)
            pipe.hlen(UNACKED_KEY)
            *depths, unacked = pipe.execute()
        waiting = GaugeMetricFamily("worldspeak_queue_messages", "Messages waiting in each queue.", labels=["queue"])
        for queue, depth in zip(QUEUES, depths, strict=True):
            waiting.add_metric([queue], depth)
        yield waiting
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
        now = datetime.now(UTC)
        schedule = settings().schedule
        succeeded = {job: None for job in schedule} | dict(runs)
        staleness = GaugeMetricFamily(
            "worldspeak_beat_job_seconds_since_success",
            "Seconds since each periodic job last succeeded (+Inf: it never has).",
            labels=["job"],
        )
        for job, succeeded_at in sorted(succeeded.items()):
            staleness.add_metric([job], (now - succeeded_at).total_seconds() if succeeded_at else float("inf"))
        yield staleness
        interval = GaugeMetricFamily(
            "worldspeak_beat_job_interval_seconds",
            "Configured seconds between runs of each periodic job.",
            labels=["job"],
        )
        for job, seconds in sorted(schedule.items()):
            interval.add_metric([job], seconds)
        yield interval
        letters = GaugeMetricFamily(
            "worldspeak_dead_letters_pending", "Dead letters not yet replayed, by source.", labels=["source"]
        )
        for source, count in pending:
            letters.add_metric([source], count)
        yield letters


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every process on this host plus the scrape-time gauges, and its content type."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics.directory())
    registry.register(LiveCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
