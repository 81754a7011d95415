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

What is truer read at scrape time than counted is read at scrape time: queue depths (the broker, Redis
or RabbitMQ alike), the workers alive (their heartbeats in Redis), how long ago each beat job last
succeeded, how many dead letters wait and which sessions wait on locks (PostgreSQL).
"""

from __future__ import annotations

import glob
import os
import socket
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import kombu
import redis
import sqlalchemy as sa
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker import db, liveness
from worker.cache import redis_client
from worker.config import settings
from worker.logs import get_logger
from worker.tables import dead_letters, maintenance_runs

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from worker.metering import Outcome

log = get_logger(__name__)

SCRAPE_STATEMENT_TIMEOUT_MS = 2000
BROKER_SCRAPE_TIMEOUT = 2  # seconds for each connect, read and write of the broker during a scrape
IDLE_IN_TRANSACTION_SECONDS = 5  # a session idle this long inside a transaction is reported
DEAD_LETTER_SOURCES = ("usage", "stripe")  # reported from 0, so the first letter is an increase
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
for _source in DEAD_LETTER_SOURCES:
    DEAD_LETTERS.labels(_source)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
                log.warning(f"metrics_{dependency}_unavailable", error=_first_line(exc))
                up.add_metric([dependency], 0)
        yield up

    @staticmethod
    def _from_redis() -> Iterator[Metric]:
        """From the workers' heartbeats in the quota cache's Redis (worker.liveness), whatever the broker is:
        how many live, and how many consume each queue."""
        from worker.celery_app import QUEUES  # here: celery_app imports this module (for its signals)

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
        from worker.celery_app import QUEUES, app

        timeouts = {"socket_timeout": BROKER_SCRAPE_TIMEOUT, "socket_connect_timeout": BROKER_SCRAPE_TIMEOUT}
        timeouts |= {"read_timeout": BROKER_SCRAPE_TIMEOUT, "write_timeout": BROKER_SCRAPE_TIMEOUT}
        with app.connection_for_read(
            url, connect_timeout=BROKER_SCRAPE_TIMEOUT, transport_options=timeouts
        ) as connection:
            try:
                connection.ensure_connection(max_retries=0)
                depths = {queue: _ready_messages(connection, queue) for queue in QUEUES}
                unacked = _unacked_messages(connection)
            except (*connection.connection_errors, *connection.channel_errors) as exc:
                raise OperationalError(_first_line(exc)) from exc
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
        for source, count in (dict.fromkeys(DEAD_LETTER_SOURCES, 0) | dict(pending)).items():
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
    channel = connection.default_channel
    with channel.conn_or_acquire() as client:
        return client.hlen(channel.unacked_key)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every process on this host plus the scrape-time gauges, and its content type."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory())
    registry.register(LiveCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
