"""The measurements. Each Celery path is measured twice: its throughput by draining a backlog published
before the workers start (producers are app servers elsewhere; here they would take the cores the
workers need), then its latency with events published at half that rate into running workers, so the
latency is the path's own and not time spent queued behind a backlog."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from bench import harness
from bench.data import Stream, Totals, totals
from bench.noop import NOOP_TASK
from worker import db, http_models, quota, sessions, sqlarrays
from worker.celery import app
from worker.clock import utcnow
from worker.config import settings
from worker.metering import events, pipeline
from worker.metering.events import to_ms

LATENCY_RATE_FRACTION = 0.5  # latency runs publish at this fraction of the measured throughput


@dataclass
class Result:
    name: str
    events: int  # distinct events (or no-op messages) in the throughput run
    seconds: float  # wall time of the throughput run
    machine_cpu_seconds: float  # CPU time the whole (shared) machine spent during it
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the processes doing the work, by group
    latencies: list[float] = field(default_factory=list)  # seconds, publish -> committed, one per event
    latency_rate: float | None = None  # events/s offered during the latency run
    memory: harness.MemoryPeaks | None = None
    transaction_seconds_per_event: float | None = None  # a database connection's time per event
    events_per_transaction: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_ms_per_event(self) -> float:
        """CPU of the processes doing the work (services, PostgreSQL backends, Redis, bench) per event."""
        return 1000 * sum(self.cpu.values()) / self.events

    @property
    def machine_cpu_ms_per_event(self) -> float:
        return 1000 * self.machine_cpu_seconds / self.events

    def cpu_split(self) -> str:
        return ", ".join(f"{group} {1000 * seconds / self.events:.3f}" for group, seconds in self.cpu.items()
                         if seconds >= 0.000001 * self.events)  # fmt: skip

    def latency_ms(self, fraction: float) -> float:
        return 1000 * harness.percentile(self.latencies, fraction)


@dataclass(frozen=True)
class Message:
    """One Celery message: its task, arguments, and the ids that are done when it is."""

    task: str
    args: list
    ids: list[str]
    task_id: str | None = None


@dataclass
class Context:
    env: dict[str, str]
    log_dir: Path
    redis_url: str
    run_id: str
    concurrency: int
    web_url: str = ""

    def cpu_account(self, *services: harness.Service) -> harness.CpuAccount:
        return harness.CpuAccount(list(services), self.redis_url, sa.engine.make_url(self.env["DATABASE_URL"]).database)


# -- messages ----------------------------------------------------------------------------------------------


def noop_messages(count: int, tag: str) -> list[Message]:
    ids = [f"noop.{tag}.{number}" for number in range(count)]
    return [Message(NOOP_TASK, [{"n": number}], [task_id], task_id) for number, task_id in enumerate(ids)]


def single_messages(stream: Stream) -> list[Message]:
    return [Message("metering.record_usage", [event], [event["event_id"]]) for event in stream.events]


def batch_messages(stream: Stream, size: int = events.MAX_BATCH_EVENTS) -> list[Message]:
    chunks = [stream.events[start : start + size] for start in range(0, len(stream.events), size)]
    return [Message("metering.record_usage_batch", [chunk], [e["event_id"] for e in chunk]) for chunk in chunks]


def publish(messages: Iterable[Message], published: dict[str, float], rate: float | None = None) -> None:
    """Send the messages (at `rate` messages per second when given), noting when each id was first sent."""
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for number, message in enumerate(messages):
            if rate:
                delay = started + number / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sent_at = time.time()
            for event_id in message.ids:
                published.setdefault(event_id, sent_at)
            app.send_task(message.task, args=message.args, task_id=message.task_id, queue="usage", producer=producer)


# -- checks ------------------------------------------------------------------------------------------------


def check_totals(name: str, added: Totals, stream: Stream, periods: bool = True) -> None:
    """The database gained exactly the stream's distinct events and their milliseconds, nothing else."""
    expected = {
        "ledger_events": len(stream.unique_ids),
        "ledger_ms": stream.total_ms,
        "tracking_ms": stream.total_ms,
        "period_ms": stream.total_ms if periods else 0,
        "dead_letters": 0,
    }
    wrong = {key: (getattr(added, key), value) for key, value in expected.items() if getattr(added, key) != value}
    if wrong:
        raise AssertionError(f"{name}: the database does not match the events sent (found, expected): {wrong}")


def worker_transactions(metrics_dir: str) -> tuple[float | None, float | None]:
    """From the workers' Prometheus files: (seconds in metering transactions per event, events per
    transaction)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    wanted = ("worldspeak_usage_commit_seconds_sum", "worldspeak_usage_batch_events_sum",
              "worldspeak_usage_batch_events_count")  # fmt: skip
    sums = dict.fromkeys(wanted, 0.0)
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    events, transactions = sums["worldspeak_usage_batch_events_sum"], sums["worldspeak_usage_batch_events_count"]
    if not transactions:
        return None, None
    return sums["worldspeak_usage_commit_seconds_sum"] / events, events / transactions


# -- Celery paths ------------------------------------------------------------------------------------------


def _latencies(completions: harness.Completions, published: dict[str, float]) -> list[float]:
    return [completions.done[event_id] - sent_at for event_id, sent_at in published.items()]


def celery_path(
    context: Context,
    name: str,
    backlog: list[Message],
    paced: list[Message],
    stream: Stream | None,
    paced_stream: Stream | None,
    include: str | None = None,
) -> Result:
    """Throughput draining `backlog`, then latency with `paced` sent at half that rate; totals checked."""
    harness.reset_redis(context.redis_url, context.run_id)
    before = totals()
    publish(backlog, {})
    expected = {event_id for message in backlog for event_id in message.ids}
    worker = harness.start_worker(f"bench-{name}", context.env, context.log_dir, context.concurrency, include)
    try:
        with harness.MemoryWatch(worker):
            account, cpu_start = context.cpu_account(worker), harness.machine_cpu_seconds()
            completions = harness.Completions([harness.LogReader(worker.log_path)])
            completions.wait_for(expected, timeout=600)
            cpu = harness.machine_cpu_seconds() - cpu_start
            finished = max(completions.done[event_id] for event_id in expected)
            result = Result(name, len(expected), finished - completions.ready_at, cpu, account.spent())
            _count_transactions(result, context)
            if stream is not None:
                check_totals(name, totals().minus(before), stream)
            _measure_latency(result, paced, completions, stream, paced_stream)
        result.memory = worker.memory()
    finally:
        worker.stop()
    return result


def _count_transactions(result: Result, context: Context) -> None:
    per_event, per_transaction = worker_transactions(context.env["PROMETHEUS_MULTIPROC_DIR"])
    result.transaction_seconds_per_event, result.events_per_transaction = per_event, per_transaction


def _measure_latency(
    result: Result,
    paced: list[Message],
    completions: harness.Completions,
    stream: Stream | None,
    paced_stream: Stream | None,
) -> None:
    if not paced:
        return
    before = totals()
    per_message = sum(len(message.ids) for message in paced) / len(paced)
    result.latency_rate = LATENCY_RATE_FRACTION * result.rate
    published: dict[str, float] = {}
    publish(paced, published, rate=result.latency_rate / per_message)
    completions.wait_for(set(published), timeout=300)
    result.latencies = _latencies(completions, published)
    if stream is not None and paced_stream is not None:
        check_totals(f"{result.name} (latency run)", totals().minus(before), paced_stream)


# -- HTTP path ---------------------------------------------------------------------------------------------


def _post_all(
    url: str, bodies: list[bytes], ids: list[list[str]], published: dict[str, float], rate: float | None, threads: int
) -> None:
    """POST the encoded {"events": [...]} bodies from `threads` clients, at `rate` requests per second when
    given. Bodies are encoded beforehand: app servers post from other machines, so the bench's clients
    should take as little of these cores as they can."""
    headers = {"Authorization": f"Bearer {harness.INGEST_TOKEN}", "Content-Type": "application/json"}
    started = time.perf_counter()

    def post(number: int) -> None:
        if rate:
            delay = started + number / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        sent_at = time.time()
        for event_id in ids[number]:
            published.setdefault(event_id, sent_at)
        response = clients[number % threads].post(url, content=bodies[number], headers=headers, timeout=60)
        if response.status_code != 202 or response.json()["rejected"]:
            raise RuntimeError(f"POST /v1/usage-events answered {response.status_code}: {response.text[:500]}")

    clients = [httpx.Client() for _ in range(threads)]
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(post, range(len(bodies))))
    finally:
        for client in clients:
            client.close()


def _encoded(stream: Stream) -> tuple[list[bytes], list[list[str]]]:
    messages = batch_messages(stream)
    return [json.dumps({"events": m.args[0]}).encode() for m in messages], [m.ids for m in messages]


def http_path(context: Context, stream: Stream, paced_stream: Stream, threads: int = 4) -> Result:
    """The web applies each request's events itself (a 202 means committed): throughput of bodies posted
    as fast as `threads` clients can, then latency; no worker runs."""
    harness.reset_redis(context.redis_url, context.run_id)
    url = f"{context.web_url}/v1/usage-events"
    bodies, ids = _encoded(stream)
    paced_bodies, paced_ids = _encoded(paced_stream)
    web = harness.start_web(context.env, context.log_dir)
    try:
        with harness.MemoryWatch(web):
            completions = harness.Completions([harness.LogReader(web.log_path)])
            before = totals()
            published: dict[str, float] = {}
            account, cpu_start = context.cpu_account(web), harness.machine_cpu_seconds()
            _post_all(url, bodies, ids, published, None, threads)
            completions.wait_for(stream.unique_ids, timeout=600)
            cpu = harness.machine_cpu_seconds() - cpu_start
            first_post = min(published.values())
            finished = max(completions.done[event_id] for event_id in stream.unique_ids)
            result = Result("http", len(stream.unique_ids), finished - first_post, cpu, account.spent())
            _count_transactions(result, context)
            check_totals("http", totals().minus(before), stream)
            before = totals()
            result.latency_rate = LATENCY_RATE_FRACTION * result.rate
            paced_published: dict[str, float] = {}
            per_body = len(paced_stream.events) / len(paced_bodies)
            _post_all(url, paced_bodies, paced_ids, paced_published, result.latency_rate / per_body, threads)
            completions.wait_for(paced_stream.unique_ids, timeout=300)
            result.latencies = [completions.done[i] - paced_published[i] for i in paced_stream.unique_ids]
            check_totals("http (latency run)", totals().minus(before), paced_stream)
        result.memory = web.memory()
        result.note = (
            f"web (`python -m worker web`, WEB_CONCURRENCY={settings().web_concurrency} processes) peak "
            f"{web.memory().child_mib:.0f} MiB per process; {threads} client threads"
        )
    finally:
        web.stop()
    return result


# -- without Celery ----------------------------------------------------------------------------------------


class StatementTimes:
    """Time spent in each SQL statement (driver and server), summed, from SQLAlchemy's cursor events."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @staticmethod
    def _name(statement: str) -> str:
        words = " ".join(statement.split()[:6])
        return words[:70]

    def __enter__(self) -> StatementTimes:
        sa.event.listen(db.engine(), "before_cursor_execute", self._before)
        sa.event.listen(db.engine(), "after_cursor_execute", self._after)
        return self

    def __exit__(self, *_exc: object) -> None:
        sa.event.remove(db.engine(), "before_cursor_execute", self._before)
        sa.event.remove(db.engine(), "after_cursor_execute", self._after)

    def _before(self, conn, _cursor, _statement, _parameters, _context, _executemany) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def _after(self, conn, _cursor, statement, _parameters, _context, _executemany) -> None:
        elapsed = time.perf_counter() - conn.info["bench_started"].pop()
        name = self._name(statement)
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        self.calls[name] = self.calls.get(name, 0) + 1


@dataclass
class Breakdown:
    """Where the time of the set-based path goes: each statement, commits, and Python."""

    total: float
    statements: dict[str, float]
    calls: dict[str, int]
    commit: float
    publish: float


def pg_ceiling(context: Context, stream: Stream, batch: int = events.MAX_BATCH_EVENTS) -> tuple[Result, Breakdown]:
    """The same events through `pipeline.apply_events` in this process, one connection, a commit per batch."""
    before = totals()
    latencies: list[float] = []
    commit = 0.0
    account, cpu_start = context.cpu_account(), harness.machine_cpu_seconds()
    started = time.perf_counter()
    with StatementTimes() as times:
        for start in range(0, len(stream.events), batch):
            chunk = stream.events[start : start + batch]
            began = time.perf_counter()
            with db.transaction() as conn:  # as apply_batch: the quotas are published after the commit
                pipeline.apply_events(conn, chunk, utcnow())
                committing = time.perf_counter()
            commit += time.perf_counter() - committing
            latencies += [time.perf_counter() - began] * len(chunk)
    elapsed = time.perf_counter() - started
    cpu = harness.machine_cpu_seconds() - cpu_start
    result = Result("postgresql", len(stream.unique_ids), elapsed, cpu, account.spent())
    result.latencies = latencies
    result.transaction_seconds_per_event = elapsed / len(stream.unique_ids)
    result.note = "apply_events in the bench process, one connection, 1,000 events per transaction"
    check_totals("postgresql", totals().minus(before), stream)
    publish_seconds = _quota_publish_seconds(stream, batch)
    return result, Breakdown(elapsed, times.seconds, times.calls, commit, publish_seconds)


def _quota_publish_seconds(stream: Stream, batch: int) -> float:
    """What publishing the quotas of each batch's users to Redis adds (done by the workers after commit)."""
    now = utcnow()
    with db.engine().connect() as conn:
        answers = quota.read(conn, {event["user_id"] for event in stream.events}, now)
    started = time.perf_counter()
    for start in range(0, len(stream.events), batch):
        users = {event["user_id"] for event in stream.events[start : start + batch]}
        quota.publish(answers[user] for user in users)
    return time.perf_counter() - started


# The floor of what metering must write, set-based, on one connection: the ledger (duplicates dropped), the
# hourly usage_tracking upsert and the subscription counter, over arrays prepared before the clock starts. No
# validation, no period rows, no alerts, no quotas, every event in its start hour (the totals still add up).
_BARE_SQL = f"""
    WITH new AS (
        INSERT INTO usage_events (event_id, user_id, started_at, duration_ms, language, received_at)
        SELECT e.event_id, e.user_id, {sqlarrays.ms_time("e.started_ms")}, e.ms, e.language, %(now)s
        FROM unnest(%(event_ids)s::text[], %(user_ids)s::uuid[], %(started)s::bigint[], %(ms)s::bigint[],
                    %(languages)s::text[]) AS e(event_id, user_id, started_ms, ms, language)
        ORDER BY e.event_id
        ON CONFLICT (event_id) DO NOTHING
        RETURNING user_id, started_at, duration_ms
    ), hours AS (
        INSERT INTO usage_tracking AS t (user_id, tracked_at, date, hour, microphone_ms, message_count)
        SELECT user_id, %(now)s, (started_at AT TIME ZONE 'UTC')::date,
               EXTRACT(HOUR FROM started_at AT TIME ZONE 'UTC'), sum(duration_ms), count(*)
        FROM new GROUP BY 1, 3, 4 ORDER BY 1, 3, 4
        ON CONFLICT (user_id, date, hour) DO UPDATE SET
            microphone_ms = t.microphone_ms + EXCLUDED.microphone_ms,
            message_count = t.message_count + EXCLUDED.message_count
    )
    UPDATE subscriptions s SET monthly_minutes_used = s.monthly_minutes_used + d.ms / 60000
    FROM (SELECT user_id, sum(duration_ms) AS ms FROM new GROUP BY 1 ORDER BY 1) d
    WHERE s.user_id = d.user_id
    """


def bare_sql(context: Context, stream: Stream, batch: int = events.MAX_BATCH_EVENTS) -> Result:
    """The set-based floor (_BARE_SQL), a transaction per 1,000 events on one connection."""
    before = totals()
    now = utcnow()
    batches = []
    for start in range(0, len(stream.events), batch):
        chunk = stream.events[start : start + batch]
        batches.append({
            "now": now,
            "event_ids": sqlarrays.text_array([e["event_id"] for e in chunk]),
            "user_ids": sqlarrays.bare_array([e["user_id"] for e in chunk]),
            "started": sqlarrays.bare_array([to_ms(datetime.fromisoformat(e["started_at"])) for e in chunk]),
            "ms": sqlarrays.bare_array([round(e["seconds"] * 1000) for e in chunk]),
            "languages": sqlarrays.text_array([e["language"] for e in chunk]),
        })  # fmt: skip
    latencies: list[float] = []
    with psycopg.connect(settings().database_url, options="-c timezone=UTC") as conn:
        account, cpu_start = context.cpu_account(), harness.machine_cpu_seconds()
        started = time.perf_counter()
        for params in batches:
            began = time.perf_counter()
            with conn.transaction():
                conn.execute(_BARE_SQL, params)
            latencies += [time.perf_counter() - began] * batch
        elapsed = time.perf_counter() - started
        cpu = harness.machine_cpu_seconds() - cpu_start
        result = Result("bare", len(stream.unique_ids), elapsed, cpu, account.spent())
    result.latencies = latencies[: len(stream.events)]
    result.transaction_seconds_per_event = elapsed / len(stream.unique_ids)
    added = totals().minus(before)
    check_totals("bare", Totals(added.ledger_events, added.ledger_ms, added.tracking_ms, 0, added.dead_letters),
                 stream, periods=False)  # fmt: skip
    return result


_NAIVE_LEDGER = """
    INSERT INTO usage_events (event_id, user_id, started_at, duration_ms, language, conversation_id, feature,
                              received_at)
    VALUES (%(event_id)s, %(user_id)s, %(started_at)s, %(ms)s, %(language)s, %(conversation_id)s, %(feature)s,
            %(now)s)
    ON CONFLICT (event_id) DO NOTHING
    """
_NAIVE_TOTALS = (
    """
    INSERT INTO usage_tracking AS t (user_id, tracked_at, date, hour, microphone_ms, message_count)
    VALUES (%(user_id)s, %(now)s, (CAST(%(started_at)s AS timestamptz) AT TIME ZONE 'UTC')::date,
            EXTRACT(HOUR FROM CAST(%(started_at)s AS timestamptz) AT TIME ZONE 'UTC')::int, %(ms)s, 1)
    ON CONFLICT (user_id, date, hour) DO UPDATE SET
        microphone_ms = t.microphone_ms + EXCLUDED.microphone_ms, message_count = t.message_count + 1
    """,
    """
    UPDATE subscriptions SET monthly_minutes_used = monthly_minutes_used + %(ms)s / 60000 WHERE user_id = %(user_id)s
    """,
)


def naive(context: Context, stream: Stream, connections: int) -> Result:
    """One transaction per event, single-row statements, as the seed's trigger would have it (plus the
    ledger row exactly-once needs): ledger insert, usage_tracking upsert, subscriptions update, commit.
    Every event goes into its start hour (the seed did not split across hours), so totals still add up."""
    before = totals()
    url = settings().database_url
    now = utcnow()
    latencies: list[list[float]] = [[] for _ in range(connections)]

    def run(part: int, conn: psycopg.Connection) -> None:
        for event in stream.events[part::connections]:
            values = {"conversation_id": None, "feature": None, **event}
            values.update(ms=round(event["seconds"] * 1000), now=now)
            began = time.perf_counter()
            with conn.transaction():
                if conn.execute(_NAIVE_LEDGER, values).rowcount:  # a duplicate changes nothing
                    for statement in _NAIVE_TOTALS:
                        conn.execute(statement, values)
            latencies[part].append(time.perf_counter() - began)

    conns = [psycopg.connect(url, options="-c timezone=UTC", autocommit=True) for _ in range(connections)]
    try:  # the connections stay open until their backends' CPU time is read
        account, cpu_start = context.cpu_account(), harness.machine_cpu_seconds()
        started = time.perf_counter()
        with ThreadPoolExecutor(connections) as pool:
            list(pool.map(run, range(connections), conns))
        elapsed = time.perf_counter() - started
        cpu = harness.machine_cpu_seconds() - cpu_start
        result = Result("naive", len(stream.unique_ids), elapsed, cpu, account.spent())
    finally:
        for conn in conns:
            conn.close()
    result.latencies = [value for part in latencies for value in part]
    result.transaction_seconds_per_event = sum(result.latencies) / len(result.latencies)
    result.note = f"{connections} connections in the bench process, one transaction per event"
    added = totals().minus(before)
    check_totals("naive", Totals(added.ledger_events, added.ledger_ms, added.tracking_ms, 0, added.dead_letters),
                 stream, periods=False)  # fmt: skip
    return result


# -- quota look-ups ----------------------------------------------------------------------------------------


def quota_lookups(users: list[str], count: int, choose: Callable[[list[str]], str]) -> list[float]:
    """`quota.check` for random users once every user's answer is in Redis: seconds per look-up."""
    for user in users:
        quota.check(user)  # a miss: read from PostgreSQL and published
    latencies = []
    for _ in range(count):
        user = choose(users)
        began = time.perf_counter()
        quota.check(user)
        latencies.append(time.perf_counter() - began)
    return latencies


# -- live-session grants (issue 13) ----------------------------------------------------------------------

SESSION_USE = 0.05  # seconds of microphone each timed report adds: every heartbeat records usage


@dataclass
class Grants:
    """Seconds per call of `sessions.run`, in the bench process, by kind of call."""

    first_starts: list[float]  # a user's first session: the reservation is built from PostgreSQL first
    starts: list[float]  # a further session of a user whose reservation Redis holds
    heartbeats: list[float]  # a report that records its usage and grants again
    ends: list[float]
    concurrent_grants: int = 0  # heartbeats from `threads` threads at once, in `concurrent_seconds`
    concurrent_seconds: float = 0.0
    threads: int = 0
    validation_us: dict[str, float] = field(default_factory=dict)  # validation_costs()

    @property
    def concurrent_rate(self) -> float:
        return self.concurrent_grants / self.concurrent_seconds


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    answer = call()
    return time.perf_counter() - began, answer


def _start(user: str) -> Any:
    now = utcnow()
    return sessions.run(lambda conn: sessions.start(conn, user, "en", now, feature="conversation"))


def _report(session_id: str, total: float, final: bool = False) -> Any:
    now, call = utcnow(), sessions.end if final else sessions.heartbeat
    return sessions.run(lambda conn: call(conn, session_id, total, now))


def session_grants(users: list[str], heartbeats: int, threads: int = 4) -> Grants:
    """Grant latency by kind of call, one call at a time; then grants per second from `threads` threads,
    each beating sessions of users of its own. Every session reports SESSION_USE more each time."""
    chosen = users[: max(threads * 25, min(len(users), 500))]
    grants = Grants([], [], [], [])
    open_sessions: dict[str, float] = {}
    for user in chosen:
        seconds, answer = _timed(lambda user=user: _start(user))
        grants.first_starts.append(seconds)
        open_sessions[answer.session_id] = 0.0
    ids = list(open_sessions)
    for number in range(heartbeats):
        session_id = ids[number % len(ids)]
        open_sessions[session_id] = round(open_sessions[session_id] + SESSION_USE, 3)
        seconds, _ = _timed(lambda s=session_id: _report(s, open_sessions[s]))
        grants.heartbeats.append(seconds)
    for user in chosen:
        seconds, answer = _timed(lambda user=user: _start(user))
        grants.starts.append(seconds)
        open_sessions[answer.session_id] = 0.0
    parts = [list(open_sessions)[part::threads] for part in range(threads)]

    def beat(part: list[str]) -> None:
        for number in range(heartbeats // threads):
            session_id = part[number % len(part)]
            open_sessions[session_id] = round(open_sessions[session_id] + SESSION_USE, 3)
            _report(session_id, open_sessions[session_id])

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(beat, parts))
    grants.concurrent_seconds = time.perf_counter() - began
    grants.threads, grants.concurrent_grants = threads, threads * (heartbeats // threads)
    for session_id, total in open_sessions.items():
        seconds, _ = _timed(lambda s=session_id, t=total: _report(s, t, final=True))
        grants.ends.append(seconds)
    grants.validation_us = validation_costs()
    return grants


def validation_costs(count: int = 20_000) -> dict[str, float]:
    """Microseconds to validate one JSON usage event: `json.loads` + `metering.parse_event` (what the worker
    runs), and msgspec decoding into the OpenAPI model (types, bounds and patterns, without parse_event's
    offset rule, time window, canonical ids and millisecond rounding) — for the lead's choice of where
    validation lives (issue 13)."""
    now = utcnow()
    event = {"event_id": "bench-validation", "user_id": "9b2e1a53-95a0-4c57-9a5b-21a4bf1b7d33",
             "started_at": now.isoformat(), "seconds": 12.5, "language": "pt-BR",
             "conversation_id": "5b0f9c2e-2d1c-4a8e-9f55-1c1f0f7b9d10", "feature": "conversation"}  # fmt: skip
    raw = json.dumps(event).encode()
    decoder = msgspec.json.Decoder(http_models.UsageEvent)
    costs = {}
    for name, validate in (("parse_event", lambda: events.parse_event(json.loads(raw), now)),
                           ("msgspec", lambda: decoder.decode(raw))):  # fmt: skip
        began = time.perf_counter()
        for _ in range(count):
            validate()
        costs[name] = 1_000_000 * (time.perf_counter() - began) / count
    return costs
