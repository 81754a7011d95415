"""Where a metering batch spends its CPU, in one process and one connection, without Celery:
`python -m bench.profile` (about a minute).

Creates its own database and claims a Redis database as bench.run does, loads users and some batches to
reach a steady state (most hours of the stream already have their usage_tracking row), then:

- CPU per event of this process (Python) and of the connection's PostgreSQL backend (/proc/<pid>/schedstat,
  nanoseconds), for `apply_events` and the commit, and for the quota publishing after it;
- the backend's CPU during each statement, summed by statement, and how many updates stayed HOT;
- with --explain, every statement of one batch as auto_explain sees it (ANALYZE, BUFFERS, triggers),
  loaded into this session only (the server's configuration is not touched);
- with --cprofile, the Python functions; with --perf FILE, `perf record -g` of the backend;
- with --alter SQL (repeatable), a schema variant applied after migrate, to measure what it would change.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=20, help="batches applied before measuring")
    parser.add_argument("--ledger", type=int, default=0, help="ledger rows pre-loaded first (as the scaling runs)")
    parser.add_argument("--batches", type=int, default=30, help="batches measured")
    parser.add_argument("--explain", action="store_true", help="auto_explain every statement of one batch")
    parser.add_argument("--cprofile", action="store_true", help="cProfile of the measured batches")
    parser.add_argument("--sort", default="tottime", help="cProfile order (tottime, cumulative)")
    parser.add_argument("--lines", type=int, default=35, help="cProfile lines shown")
    parser.add_argument("--alter", action="append", default=[], help="SQL run after migrate (a schema variant)")
    parser.add_argument("--perf", type=Path, help="`perf record -g` of the backend during the measured batches")
    return parser.parse_args(argv)


def backend_cpu_seconds(pid: int) -> float:
    """CPU time of a process in nanosecond resolution (/proc/<pid>/schedstat: time on a CPU)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def redis_cpu_seconds() -> float:
    from worker.cache import redis_client

    info = redis_client().info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


class StatementCpu:
    """The backend's CPU time during each statement (and each commit), summed by statement."""

    def __init__(self, engine, backend: int) -> None:
        self.engine, self.backend = engine, backend
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._started = 0.0

    def __enter__(self) -> StatementCpu:
        import sqlalchemy as sa

        sa.event.listen(self.engine, "before_cursor_execute", self._before)
        sa.event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *_exc: object) -> None:
        import sqlalchemy as sa

        sa.event.remove(self.engine, "before_cursor_execute", self._before)
        sa.event.remove(self.engine, "after_cursor_execute", self._after)

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def _before(self, *_args: object) -> None:
        self._started = backend_cpu_seconds(self.backend)

    def _after(self, _conn, _cursor, statement: str, *_args: object) -> None:
        self._add(" ".join(statement.split()[:7])[:80], backend_cpu_seconds(self.backend) - self._started)

    def report(self, events: int, total: float) -> None:
        print(f"  PostgreSQL CPU by statement (ms per 1,000 events; total {1e6 * total / events:.1f}):")
        for name, seconds in sorted(self.seconds.items(), key=lambda item: -item[1]):
            print(f"    {1e6 * seconds / events:7.2f}  {self.calls[name] * 1000 / events:5.1f} calls  {name}")
        print(f"    {1e6 * (total - sum(self.seconds.values())) / events:7.2f}  commits, parsing between statements")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import harness

    return harness.on_private_redis(lambda: profile(args))


def profile(args: argparse.Namespace) -> int:
    from bench import harness

    run_id = f"profile{os.getpid()}"
    redis_db = harness.claim_redis_db(run_id, base_url=harness.REDIS_BASE)
    database = f"ws_bench_{run_id}"
    os.environ.update(
        DATABASE_URL=harness.database_url(database),
        REDIS_URL=f"{harness.REDIS_BASE}/{redis_db}",
        LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="ws_profile_metrics_"),
    )
    from worker import db

    try:
        db.migrate(os.environ["DATABASE_URL"])
        for statement in args.alter:
            with db.transaction() as conn:
                conn.exec_driver_sql(statement)
        run(args)
    finally:
        db.engine().dispose()
        harness.drop_database(database)
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
        harness.release_redis(os.environ["REDIS_URL"])
    return 0


def run(args: argparse.Namespace) -> None:
    import sqlalchemy as sa

    from bench import data
    from worker import db, quota
    from worker.clock import utcnow
    from worker.metering import pipeline

    users = data.create_users(args.users, datetime.now(UTC))
    if args.ledger:
        data.grow_ledger(args.ledger, datetime.now(UTC))
    count = (args.warmup + args.batches + 1) * 1000
    stream = data.make_stream("profile", count, users, datetime.now(UTC), 0.02, seed=zlib.crc32(b"profile"))
    batches = [stream.events[start : start + 1000] for start in range(0, len(stream.events) - 999, 1000)]
    warmup, measured, explained = batches[: args.warmup], batches[args.warmup : -1], batches[-1]
    with db.engine().connect() as conn:
        backend = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        conn.commit()

        def apply(batch: list[dict]) -> list[quota.Quota]:
            with conn.begin():
                outcome = pipeline.apply_events(conn, batch, utcnow())
            return list(outcome.quotas.values())

        db._frames[conn] = [db._Frame()]  # after_commit callbacks are collected, not run: publishing is timed apart
        gc.freeze()  # as the workers and the web do after startup
        for batch in warmup:
            apply(batch)
        profiler = cProfile.Profile() if args.cprofile else None
        recorder = None
        if args.perf:
            recorder = subprocess.Popen(["perf", "record", "-g", "-o", str(args.perf), "-p", str(backend)],
                                        stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1)
        python, backend_start, wall = time.process_time(), backend_cpu_seconds(backend), time.perf_counter()
        answers = []
        if profiler:
            profiler.enable()
        with StatementCpu(db.engine(), backend) as statements:
            for batch in measured:
                answers.append(apply(batch))
        if profiler:
            profiler.disable()
        if recorder:
            recorder.send_signal(signal.SIGINT)
            recorder.wait()
        python, pg = time.process_time() - python, backend_cpu_seconds(backend) - backend_start
        wall = time.perf_counter() - wall
        redis_cpu = redis_cpu_seconds()
        published = time.process_time()
        for batch_answers in answers:
            quota.publish(batch_answers)
        published = time.process_time() - published
        redis_cpu = redis_cpu_seconds() - redis_cpu
        events = sum(len(batch) for batch in measured)
        print(f"{len(measured)} batches, {events:,} events, {args.users:,} users, wall {wall:.2f} s "
              f"({events / wall:,.0f} events/s)")  # fmt: skip
        print(f"  Python (apply_events)   {1000 * python / events:.4f} ms per event")
        print(f"  PostgreSQL backend      {1000 * pg / events:.4f} ms per event")
        print(f"  Python (quota.publish)  {1000 * published / events:.4f} ms per event")
        print(f"  Redis (quota.publish)   {1000 * redis_cpu / events:.4f} ms per event")
        statements.report(events, pg)
        time.sleep(1.5)  # table statistics reach pg_stat_user_tables within a second
        print("  updates that stayed on their page (HOT), whole run:")
        for row in conn.execute(sa.text(
            "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
            " WHERE relname IN ('usage_tracking', 'usage_periods', 'subscriptions') ORDER BY relname"
        )):  # fmt: skip
            print(f"    {row.relname:16} {row.n_tup_hot_upd:>8,} of {row.n_tup_upd:>8,}")
        conn.commit()
        if profiler:
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats(args.sort).print_stats(args.lines)
        if args.explain:
            explain(conn, explained, apply)


def explain(conn, batch: list[dict], apply) -> None:
    import sqlalchemy as sa

    notices: list[str] = []
    raw = conn.connection.driver_connection
    raw.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
    for statement in (
        "LOAD 'auto_explain'",
        "SET auto_explain.log_min_duration = 0",
        "SET auto_explain.log_analyze = on",
        "SET auto_explain.log_buffers = on",
        "SET auto_explain.log_triggers = on",
        "SET auto_explain.log_timing = on",
        "SET client_min_messages = log",
    ):
        conn.execute(sa.text(statement))
    conn.commit()
    started = time.perf_counter()
    apply(batch)
    elapsed = time.perf_counter() - started
    conn.execute(sa.text("SET client_min_messages = notice"))
    conn.commit()
    print(f"\n== one batch with auto_explain: {1000 * elapsed:.1f} ms (timing overhead included)")
    for notice in notices:
        print(notice.replace("duration:", "\n-- duration:"))


if __name__ == "__main__":
    sys.exit(main())
