"""Prometheus metrics, correct across several web processes and Celery's prefork pool processes.

Counters and histograms live in prometheus-client's multiprocess mode: every process writes its own
memory-mapped files under PROMETHEUS_MULTIPROC_DIR (default: one directory per host and user under the
system's temp directory), and `GET /metrics` sums the files of every process on the host.

Files are named after the process's *fleet* as well as its pid (`<host>-<fleet>-<pid>`). A fleet is the
main process of `python -m worker web` or of `celery worker` with its children. A pool process that is
replaced keeps its counts (its fleet lives on), so totals never drop while a fleet runs; when a fleet
starts, the files of fleets whose main process is gone are removed (the reset Prometheus expects after
a restart). Removing by fleet rather than wiping the directory lets several fleets share a host (a web,
and one `celery worker` per queue) without erasing each other's live counts.

What is truer read at scrape time than counted is read at scrape time: queue depths (Redis), how long
ago each beat job last succeeded and how many dead letters wait (PostgreSQL).
"""

from __future__ import annotations

import glob
import os
import socket
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import amqp.exceptions
import kombu.exceptions
import redis
import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker import db
from worker.broker import is_rabbitmq
from worker.cache import redis_client
from worker.config import settings
from worker.logs import get_logger
from worker.tables import dead_letters, maintenance_runs

if TYPE_CHECKING:
    from worker.metering import Outcome

log = get_logger(__name__)

UNACKED_KEY = "unacked"  # kombu's hash of messages delivered to a worker and not yet acknowledged
SCRAPE_STATEMENT_TIMEOUT_MS = 2000
FLEET_VARIABLE = "WORLDSPEAK_METRICS_FLEET"  # set by a fleet's main process, inherited by its children
HOST = socket.gethostname().replace("_", "-")  # "_" separates the parts of prometheus-client's file names


def directory() -> str:
    """The multiprocess directory; prometheus-client reads the variable whenever a process opens its files."""
    path = os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), f"worldspeak-metrics-{os.getuid()}")
    )
    os.makedirs(path, exist_ok=True)
    return path


def process_identifier() -> str:
    """This process's name in file names: unique on a host, and naming the fleet it belongs to."""
    pid = os.getpid()
    return f"{HOST}-{os.environ.get(FLEET_VARIABLE, pid)}-{pid}"


directory()
# Chosen explicitly (not from the variable at import time) so the order of imports cannot matter.
values.ValueClass = values.MultiProcessValue(process_identifier)

USAGE_EVENTS = Counter(
    "worldspeak_usage_events",
    "Usage events by final outcome: accepted (committed to the ledger), duplicate, rejected (dead-lettered).",
    ["outcome"],
    registry=None,
)
USAGE_BATCH_EVENTS = Histogram(
    "worldspeak_usage_batch_events",
    "Events per metering transaction.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
    registry=None,
)
USAGE_COMMIT_SECONDS = Histogram(
    "worldspeak_usage_commit_seconds",
    "Seconds to apply and commit one metering transaction.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=None,
)
STRIPE_EVENTS = Counter(
    "worldspeak_stripe_events",
    "Stripe events processed, by event type and outcome (applied, ignored, stale, dead_lettered, ...).",
    ["type", "outcome"],
    registry=None,
)
DEAD_LETTERS = Counter(
    "worldspeak_dead_letters",
    "Dead letters written (counted once their transaction committed), by source (usage, stripe, ...).",
    ["source"],
    registry=None,
)
QUOTA_CACHE_LOOKUPS = Counter(
    "worldspeak_quota_cache_lookups",
    "Quota look-ups in Redis: hit (a current answer) or miss (absent, stale or Redis unavailable).",
    ["result"],
    registry=None,
)


def usage_events(outcome: str, count: int) -> None:
    if count:
        USAGE_EVENTS.labels(outcome).inc(count)


def usage_batch_committed(outcome: Outcome, events: int, seconds: float) -> None:
    usage_events("accepted", len(outcome.accepted))
    usage_events("duplicate", len(outcome.duplicates))
    usage_events("rejected", len(outcome.rejected))
    USAGE_BATCH_EVENTS.observe(events)
    USAGE_COMMIT_SECONDS.observe(seconds)


def stripe_event(event_type: str, outcome: str) -> None:
    """Count one processed Stripe event (call it once its outcome is committed)."""
    STRIPE_EVENTS.labels(event_type, outcome).inc()


def dead_lettered(source: str, count: int) -> None:
    DEAD_LETTERS.labels(source).inc(count)


def quota_cache_lookup(hit: bool) -> None:
    QUOTA_CACHE_LOOKUPS.labels("hit" if hit else "miss").inc()


# -- fleets ------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _fleet_of(path: str) -> tuple[str, int] | None:
    """(host, fleet main pid) from a file name like counter_<host>-<fleet>-<pid>.db; None for other files."""
    parts = os.path.basename(path).removesuffix(".db").split("_")[-1].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def start_fleet() -> None:
    """Called by a fleet's main process before it starts children: name the fleet, forget dead fleets."""
    os.environ[FLEET_VARIABLE] = str(os.getpid())
    removed = 0
    for path in glob.glob(os.path.join(directory(), "*.db")):
        fleet = _fleet_of(path)
        if fleet is None or fleet[0] != HOST or _alive(fleet[1]):
            continue
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:  # another fleet starting at the same moment removed it
            pass
    log.info("metrics_fleet_started", directory=directory(), files_of_dead_fleets_removed=removed)


def process_exited() -> None:
    """Called in a pool process as it exits: its live gauges go (counters stay: they are part of totals)."""
    mark_process_dead(process_identifier(), directory())


# -- scrape ------------------------------------------------------------------------------------------------


def _waiting(depths: dict[str, int]) -> Metric:
    waiting = GaugeMetricFamily("worldspeak_queue_messages", "Messages waiting in each queue.", labels=["queue"])
    for queue, depth in depths.items():
        waiting.add_metric([queue], depth)
    return waiting


class LiveCollector:
    """Gauges read at scrape time from Redis, RabbitMQ (when it is the broker) and PostgreSQL; a dependency
    that is down shows as up=0."""

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
        if is_rabbitmq(settings().broker_url):
            try:
                yield from self._from_rabbitmq()
                up.add_metric(["broker"], 1)
            except (kombu.exceptions.KombuError, amqp.exceptions.AMQPError, OSError) as exc:
                log.warning("metrics_broker_unavailable", error=str(exc))
                up.add_metric(["broker"], 0)
        try:
            yield from self._from_postgresql()
            up.add_metric(["postgresql"], 1)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics_postgresql_unavailable", error=str(exc).splitlines()[0])
            up.add_metric(["postgresql"], 0)
        yield up

    @staticmethod
    def _from_redis() -> Iterator[Metric]:
        from worker.broker import QUEUES

        if is_rabbitmq(settings().broker_url):
            redis_client().ping()  # the quota cache; the queues are RabbitMQ's
            return
        # kombu keeps each queue as a Redis list named after it
        with redis_client().pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.llen(queue)
            pipe.hlen(UNACKED_KEY)
            *depths, unacked = pipe.execute()
        yield _waiting(dict(zip(QUEUES, depths, strict=True)))
        yield GaugeMetricFamily(
            "worldspeak_queue_unacked_messages", "Messages delivered to workers and not yet acknowledged.", unacked
        )

    @staticmethod
    def _from_rabbitmq() -> Iterator[Metric]:
        from worker.broker import waiting_messages
        from worker.celery_app import app

        yield _waiting(waiting_messages(app))  # AMQP tells no count of the unacknowledged ones

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
    MultiProcessCollector(registry, path=directory())
    registry.register(LiveCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
