"""The throughput benchmark: `python -m bench.run` (about ten minutes) or `python -m bench.run --quick`.

It creates its own PostgreSQL databases (`ws_bench_<pid>...`) and claims an empty Redis database, runs
real `celery -A worker worker` processes (and `python -m worker web`) against them, measures the paths of
issue 7 against their ceilings, checks that the database holds exactly the events sent, writes
bench/RESULTS.md, and drops what it created. It exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import free_port

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NOTES = Path(__file__).resolve().parent / "NOTES.md"  # profiles and what was changed, written by hand


@dataclass(frozen=True)
class Sizes:
    noop: int
    single: int
    batch: int
    http: int
    naive: int
    postgresql: int
    paced_fraction: float  # latency runs send this fraction of the throughput run's events
    quota_lookups: int
    scale_events: int
    ledger_sizes: tuple[int, ...]
    user_counts: tuple[int, ...]
    session_heartbeats: int


FULL = Sizes(20_000, 50_000, 200_000, 100_000, 5_000, 100_000, 0.25, 10_000, 50_000,
             (10_000, 100_000, 1_000_000), (1_000, 100_000), 5_000)  # fmt: skip
QUICK = Sizes(3_000, 5_000, 20_000, 10_000, 1_000, 20_000, 0.5, 2_000, 10_000, (10_000, 100_000), (1_000, 10_000),
              1_000)  # fmt: skip
# Users of the main runs (--users): at 25,000 events/s, 10,000 users speak 2.5 events a second each, so
# two concurrent batches share some users, as they would in production; the scaling runs show 1,000
# (every batch shares most of its users with the one beside it) and 100,000.
USERS = 10_000
LOAD_AT_START = os.getloadavg()
FULL_FLUSH_INTERVAL = 1.0  # seconds: single events coalesced until 1,000 or this long
DUPLICATES = 0.02  # the single, batch and HTTP streams send this fraction of their events twice


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a minute or two")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork processes per worker (default 2)")
    parser.add_argument("--users", type=int, default=USERS, help=f"users of the main runs (default {USERS:,})")
    parser.add_argument("--skip-scaling", action="store_true", help="leave out the ledger and user scaling runs")
    parser.add_argument(
        "--only", help="comma-separated main runs: noop,single,batch,http,naive,bare,postgresql,sessions"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the results go (bench/RESULTS.md)")
    # one scaling run in its own process (and database), started by the main run
    parser.add_argument("--scale-users", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scale-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--redis-db", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def environment(run_id: str, database: str, redis_db: int) -> dict[str, str]:
    """The variables of the bench, its workers and its web; set before any worker module is imported."""
    from bench import harness

    return {
        **os.environ,
        "DATABASE_URL": harness.database_url(database),
        "REDIS_URL": f"{harness.REDIS_BASE}/{redis_db}",
        "LOG_LEVEL": "INFO",  # as the Procfile runs the worker; the bench reads committed events from the logs
        "INGEST_API_TOKENS": harness.INGEST_TOKEN,
        "PORT": str(free_port()),
        "PROMETHEUS_MULTIPROC_DIR": str(Path(tempfile.gettempdir()) / f"ws_bench_metrics_{run_id}_{database}"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import harness

    if args.scale_users or "BENCH_PG_URL" in os.environ:  # a scaling run, or servers given on purpose
        return measure(args)
    # Servers of the bench's own: PostgreSQL with the settings the README recommends (the shared server keeps
    # its own), and Redis (no free database of the shared one needed). The scaling runs' processes inherit them.
    with (
        harness.PrivatePostgres(harness.recommended_settings(), free_port()) as cluster,
        harness.PrivateRedis(free_port()) as private_redis,
    ):
        os.environ["BENCH_PG_URL"] = harness.PG_BASE = cluster.url
        os.environ["BENCH_REDIS_URL"] = harness.REDIS_BASE = private_redis.url
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    from bench import harness

    run_id = args.run_id or str(os.getpid())
    owns_redis = args.redis_db is None
    redis_db = harness.claim_redis_db(run_id, base_url=harness.REDIS_BASE) if owns_redis else args.redis_db
    database = f"ws_bench_{run_id}" + (f"_u{args.scale_users}" if args.scale_users else "")
    env = environment(run_id, database, redis_db)
    os.environ.update(env)
    log_dir = Path(tempfile.mkdtemp(prefix=f"ws_bench_{run_id}_"))
    from worker import db

    try:
        db.migrate(env["DATABASE_URL"])
        sizes = QUICK if args.quick else FULL
        if args.scale_users:
            results = scale(env, log_dir, run_id, args, sizes)
            args.scale_json.write_text(json.dumps(results))
        else:
            main_run(env, log_dir, run_id, args, sizes, redis_db)
    finally:
        db.engine().dispose()
        harness.drop_database(database)
        if owns_redis:
            harness.release_redis(env["REDIS_URL"])
        shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


# -- the main runs -----------------------------------------------------------------------------------------


def main_run(env: dict[str, str], log_dir: Path, run_id: str, args: argparse.Namespace, sizes: Sizes,
             redis_db: int) -> None:  # fmt: skip
    from bench import data, phases

    now = datetime.now(UTC)
    started = time.monotonic()
    users = data.create_users(args.users, now)
    context = phases.Context(env, log_dir, env["REDIS_URL"], run_id, args.concurrency,
                             f"http://127.0.0.1:{env['PORT']}")  # fmt: skip
    only = set(args.only.split(",")) if args.only else None
    results: dict[str, phases.Result] = {}
    breakdown = None

    def wanted(name: str) -> bool:
        return only is None or name in only

    def stream(tag: str, count: int, duplicates: float = DUPLICATES) -> data.Stream:
        return data.make_stream(tag, count, users, datetime.now(UTC), duplicates, seed=zlib.crc32(tag.encode()))

    def paced(count: int) -> int:
        return max(1_000, int(count * sizes.paced_fraction))

    if wanted("noop"):
        print("celery ceiling: no-op tasks", flush=True)
        results["noop"] = phases.celery_path(context, "noop", phases.noop_messages(sizes.noop, "backlog"),
                                             phases.noop_messages(paced(sizes.noop), "paced"), None, None,
                                             include="bench.noop")  # fmt: skip
    if wanted("single"):
        print("single-event path: metering.record_usage", flush=True)
        backlog, later = stream("single", sizes.single), stream("single-paced", paced(sizes.single))
        results["single"] = phases.celery_path(context, "single", phases.single_messages(backlog),
                                               phases.single_messages(later), backlog, later)  # fmt: skip
        # The same path where the broker is not the limit: flushes wait up to a second, so they fill to
        # 1,000 events at the rate the broker delivers, as they would from a faster broker at 50 ms.
        full = stream("single-full", sizes.single)
        filled = replace(context, env={**context.env, "USAGE_FLUSH_INTERVAL": str(FULL_FLUSH_INTERVAL)})
        results["single_full"] = phases.celery_path(filled, "single-full", phases.single_messages(full), [], full,
                                                    None)  # fmt: skip
    if wanted("batch"):
        print("batch path: metering.record_usage_batch", flush=True)
        backlog, later = stream("batch", sizes.batch), stream("batch-paced", paced(sizes.batch))
        results["batch"] = phases.celery_path(context, "batch", phases.batch_messages(backlog),
                                              phases.batch_messages(later), backlog, later)  # fmt: skip
    if wanted("http"):
        print("HTTP path: POST /v1/usage-events", flush=True)
        harness_stream, later = stream("http", sizes.http), stream("http-paced", paced(sizes.http))
        results["http"] = phases.http_path(context, harness_stream, later)
    if wanted("naive"):
        print("naive baseline: one transaction per event", flush=True)
        results["naive"] = phases.naive(context, stream("naive", sizes.naive), args.concurrency)
    if wanted("bare"):
        print("bare set-based SQL: the three effects, one connection", flush=True)
        results["bare"] = phases.bare_sql(context, stream("bare", sizes.postgresql))
    if wanted("postgresql"):
        print("PostgreSQL ceiling: apply_events in process", flush=True)
        results["postgresql"], breakdown = phases.pg_ceiling(context, stream("postgresql", sizes.postgresql))
    grants = None
    if wanted("sessions"):
        print("live-session grants: worker.sessions in process", flush=True)
        grants = phases.session_grants(users, sizes.session_heartbeats)
    print("quota look-ups", flush=True)
    rng = random.Random(1)
    lookups = phases.quota_lookups(users, sizes.quota_lookups, rng.choice)
    scaling: list[dict[str, Any]] = []
    if not args.skip_scaling:
        for count in sizes.user_counts:
            scaling += run_scaling_process(run_id, redis_db, count, args, log_dir)
    write_results(args.output, args, sizes, results, breakdown, lookups, scaling, grants, time.monotonic() - started)
    print(f"wrote {args.output}", flush=True)


# -- scaling -----------------------------------------------------------------------------------------------


def run_scaling_process(run_id: str, redis_db: int, users: int, args: argparse.Namespace, log_dir: Path) -> list:
    """A scaling run in its own process: its own database, so its DATABASE_URL is set before import."""
    print(f"scaling: {users:,} users", flush=True)
    output = log_dir / f"scale_{users}.json"
    command = [sys.executable, "-m", "bench.run", "--scale-users", str(users), "--scale-json", str(output),
               "--redis-db", str(redis_db), "--run-id", run_id, "--concurrency", str(args.concurrency)]  # fmt: skip
    if args.quick:
        command.append("--quick")
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(output.read_text())


def scale(env: dict[str, str], log_dir: Path, run_id: str, args: argparse.Namespace, sizes: Sizes) -> list[dict]:
    """Batch-path throughput with the ledger pre-loaded to each size, for `args.scale_users` users."""
    from bench import data, phases

    now = datetime.now(UTC)
    prepare = time.monotonic()
    users = data.create_users(args.scale_users, now)
    context = phases.Context(env, log_dir, env["REDIS_URL"], run_id, args.concurrency)
    results = []
    for size in sizes.ledger_sizes:
        data.grow_ledger(size, now)
        ledger = data.ledger_size()
        stream = data.make_stream(f"scale{size}", sizes.scale_events, users, datetime.now(UTC), DUPLICATES, seed=size)
        print(f"  ledger {ledger:,} rows, {args.scale_users:,} users (prepared in {time.monotonic() - prepare:.0f} s)",
              flush=True)  # fmt: skip
        result = phases.celery_path(context, f"scale-{size}", phases.batch_messages(stream), [], stream, None)
        results.append({"users": args.scale_users, "ledger_target": size, "ledger": ledger, "events": result.events,
                        "rate": result.rate, "cpu_ms_per_event": result.cpu_ms_per_event,
                        "transaction_ms_per_event": 1000 * (result.transaction_seconds_per_event or float("nan")),
                        "peak_mib": result.memory.child_mib if result.memory else None})  # fmt: skip
        prepare = time.monotonic()
    return results


# -- RESULTS.md ----------------------------------------------------------------------------------------------


def _command(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> list[str]:
    import celery
    import redis

    from worker import db

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    with db.engine().connect() as conn:
        import sqlalchemy as sa

        postgres = conn.execute(sa.text("SHOW server_version")).scalar_one()
        settings = dict(conn.execute(sa.text(
            "SELECT name, setting FROM pg_settings WHERE name IN ('shared_buffers', 'synchronous_commit', 'fsync',"
            " 'max_wal_size', 'checkpoint_timeout')"
        )).all())  # fmt: skip
    redis_version = redis.Redis.from_url(os.environ["REDIS_URL"]).info("server")["redis_version"]
    commit = _command(["git", "rev-parse", "--short", "HEAD"])
    dirty = _command(
        [
            "git",
            "status",
            "--porcelain",
            "--",
            "worker",
            "bench",
            "schema.sql",
            f":!{RESULTS.relative_to(RESULTS.parent.parent)}",
        ]
    )
    return [
        f"- commit `{commit}`" + (" (with uncommitted changes in worker/, bench/ or schema.sql)" if dirty else ""),
        f"- {os.cpu_count()} CPUs (`nproc` {_command(['nproc'])}), {cpu}; {memory_kib / 1024 / 1024:.1f} GiB memory",
        f"- PostgreSQL {postgres}, a cluster of the bench's own started with the README's settings (shared_buffers "
        f"{int(settings['shared_buffers']) * 8 // 1024} MiB, max_wal_size {settings['max_wal_size']} MB, "
        f"checkpoint_timeout {settings['checkpoint_timeout']} s; fsync {settings['fsync']}, synchronous_commit "
        f"{settings['synchronous_commit']}); Redis {redis_version}; all on this host",
        f"- Python {platform.python_version()}, Celery {celery.__version__}, {platform.platform()}",
    ]


def _ms(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.2f}"


LABELS = {
    "noop": "1 Celery ceiling: no-op task, one message each",
    "single": "2 single-event path `metering.record_usage`",
    "single_full": f"2 the same, flushes filled (`USAGE_FLUSH_INTERVAL={FULL_FLUSH_INTERVAL:g}`)",
    "batch": "3 batch path `metering.record_usage_batch` (1,000 a message)",
    "http": "3 HTTP path `POST /v1/usage-events` (1,000 a request)",
    "naive": "4 naive baseline: a transaction per event",
    "bare": "5 bare set-based SQL: ledger, hourly upsert, subscription counter; one connection",
    "postgresql": "6 the product's statements: `apply_events` in the bench process, one connection",
}


def _table(results: dict) -> list[str]:
    lines = [
        "| run | events | events/s | p50 ms | p99 ms | latency measured at (events/s) | CPU ms per event "
        "| of which (ms) | machine CPU ms per event | connection ms per event | peak RSS MiB main / pool process |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, result in results.items():
        memory = f"{result.memory.main_mib:.0f} / {result.memory.child_mib:.0f}" if result.memory else "(bench process)"
        offered = (
            f"{result.latency_rate:,.0f}"
            if result.latency_rate
            else ("as fast as possible" if result.latencies else "–")
        )
        transaction = result.transaction_seconds_per_event
        lines.append(
            f"| {LABELS[name]} | {result.events:,} | **{result.rate:,.0f}** | {_latency(result, 0.5)} "
            f"| {_latency(result, 0.99)} | {offered} | {result.cpu_ms_per_event:.3f} | {result.cpu_split()} "
            f"| {result.machine_cpu_ms_per_event:.3f} | {_ms(1000 * transaction if transaction else None)}"
            f"{_per_transaction(result)} | {memory} |"
        )
    return lines


def _latency(result: Any, fraction: float) -> str:
    return f"{result.latency_ms(fraction):.1f}" if result.latencies else "–"


def _per_transaction(result: Any) -> str:
    return f" ({result.events_per_transaction:,.0f} a transaction)" if result.events_per_transaction else ""


def _verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def _per_event(result: Any, *groups: str) -> float:
    """CPU ms per event of the given process groups."""
    return 1000 * sum(result.cpu.get(group, 0.0) for group in groups) / result.events


def _targets(results: dict, lookups: list[float], scaling: list[dict]) -> list[str]:
    from bench import harness

    lines = []
    batch, single, noop = results.get("batch"), results.get("single"), results.get("noop")
    http, bare = results.get("http"), results.get("bare")
    if batch:
        postgresql, worker = _per_event(batch, "postgresql"), _per_event(batch, "bench-batch", "redis")
        lines += [
            f"- batch path, PostgreSQL CPU per event <= 0.025 ms: {postgresql:.4f} ms — "
            f"{_verdict(postgresql <= 0.025)}",
            f"- batch path, worker CPU per event (main and pool processes, Redis) <= 0.03 ms: {worker:.4f} ms — "
            f"{_verdict(worker <= 0.03)}",
            f"- batch path >= 25,000 events/s end to end: {batch.rate:,.0f} — {_verdict(batch.rate >= 25_000)}",
        ]
    if batch and bare:
        ratio = batch.rate / bare.rate
        lines.append(f"- batch path >= 1/2 of the bare set-based SQL: {batch.rate:,.0f} / {bare.rate:,.0f} = "
                     f"{ratio:.2f} — {_verdict(ratio >= 0.5)}")  # fmt: skip
    if single and noop:
        ratio = single.rate / noop.rate
        lines.append(f"- single-event path >= the Celery ceiling: {single.rate:,.0f} / {noop.rate:,.0f} = "
                     f"{100 * ratio:.0f} % — {_verdict(ratio >= 1)}")  # fmt: skip
    if http and batch:
        ratio = http.rate / batch.rate
        lines.append(f"- HTTP path within 15 % of the batch path: {http.rate:,.0f} / {batch.rate:,.0f} = "
                     f"{100 * ratio:.0f} % — {_verdict(ratio >= 0.85)}")  # fmt: skip
    by_size = {(row["users"], row["ledger_target"]): row for row in scaling}
    for users in sorted({row["users"] for row in scaling}):
        sizes = sorted(size for u, size in by_size if u == users)
        if len(sizes) >= 2:
            small, large = by_size[users, sizes[0]], by_size[users, sizes[-1]]
            ratio = large["rate"] / small["rate"]
            lines.append(f"- {users:,} users: throughput at {large['ledger']:,} ledger rows within 20 % of "
                         f"{small['ledger']:,}: {large['rate']:,.0f} / {small['rate']:,.0f} = {100 * ratio:.0f} % — "
                         f"{_verdict(ratio >= 0.8)}")  # fmt: skip
    p99 = 1000 * harness.percentile(lookups, 0.99)
    lines.append(f"- quota look-up p99 < 1 ms: {p99:.3f} ms — {_verdict(p99 < 1)}")
    peaks = [r.memory.child_mib for r in results.values() if r.memory] + [r.memory.main_mib for r in results.values()
                                                                          if r.memory]  # fmt: skip
    if peaks:
        lines.append(f"- every worker process < 200 MB: largest {max(peaks):.0f} MiB — {_verdict(max(peaks) < 190.7)}")
    return lines


def _breakdown(breakdown: Any) -> list[str]:
    if breakdown is None:
        return []
    in_sql = sum(breakdown.statements.values())
    lines = [
        "",
        "### Where the time of the set-based path goes (measured in the PostgreSQL-ceiling run)",
        "",
        f"{breakdown.total:.2f} s for the run. Time inside each statement (driver and server, from SQLAlchemy's "
        "cursor events), the commits, and the rest (Python: validation, splitting, aggregation, building the "
        "arrays):",
        "",
        "| part | seconds | share | calls |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in sorted(breakdown.statements.items(), key=lambda item: -item[1]):
        lines.append(
            f"| `{name}` | {seconds:.2f} | {100 * seconds / breakdown.total:.0f} % | {breakdown.calls[name]:,} |"
        )
    rest = breakdown.total - in_sql - breakdown.commit
    lines += [
        f"| COMMIT, then publishing the quotas | {breakdown.commit:.2f} "
        f"| {100 * breakdown.commit / breakdown.total:.0f} % | |",
        f"| Python outside the statements | {rest:.2f} | {100 * rest / breakdown.total:.0f} % | |",
        "",
        f"Publishing the quotas of each batch's users to Redis alone (as after each commit) takes "
        f"{breakdown.publish:.2f} s for the same batches.",
    ]
    return lines


def _grants(grants: Any, lookups: list[float]) -> list[str]:
    from bench import harness

    if grants is None:
        return []

    def ms(values: list[float], fraction: float) -> str:
        return f"{1000 * harness.percentile(values, fraction):.2f}"

    rows = [("a user's first start (reservation built from PostgreSQL first)", grants.first_starts),
            ("a start (reservation in Redis)", grants.starts),
            ("a heartbeat (records its usage, grants again)", grants.heartbeats),
            ("an end (records, releases)", grants.ends),
            ("quota look-up `worker.quota.check`, same run (Redis, with the held seconds)", lookups)]  # fmt: skip
    lines = ["", "## Live-session grants (issue 13)", "",
             "`worker.sessions.run` from the bench process, one call at a time: each call is one transaction "
             "(the user's shared advisory lock, the session row, the usage through `metering.apply_events`) and "
             "two Redis scripts (the reservation before the commit, its settle after).", "",
             "| call | calls | p50 ms | p99 ms |", "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {label} | {len(values):,} | {ms(values, 0.5)} | {ms(values, 0.99)} |" for label, values in rows]
    lines += ["", f"Grants per second, {grants.threads} threads beating sessions at once: "
                  f"**{grants.concurrent_rate:,.0f}** ({grants.concurrent_grants:,} heartbeats in "
                  f"{grants.concurrent_seconds:.1f} s); one at a time: "
                  f"{len(grants.heartbeats) / sum(grants.heartbeats):,.0f} a second."]  # fmt: skip
    costs = grants.validation_us
    lines += [
        "",
        f"Validating one JSON usage event: `json.loads` + `metering.parse_event` {costs['parse_event']:.1f} µs; "
        f"msgspec decoding into the OpenAPI model (`http_models.UsageEvent`) {costs['msgspec']:.1f} µs, without "
        "parse_event's offset rule, time window, canonical ids and millisecond rounding, which would follow it.",
    ]
    return lines


def write_results(path: Path, args: argparse.Namespace, sizes: Sizes, results: dict, breakdown: Any,
                  lookups: list[float], scaling: list[dict], grants: Any, seconds: float) -> None:  # fmt: skip
    from bench import harness

    command = "python -m bench.run" + (" --quick" if args.quick else "")
    lines = [
        "# Throughput benchmark (issues 7 and 14)",
        "",
        f"Written by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {seconds / 60:.1f} minutes. Machine:",
        "",
        *machine(),
        "",
        f"Workers: `celery -A worker worker -Q usage,stripe,maintenance -l INFO`, prefork, concurrency "
        f"{args.concurrency}, the settings of `worker.celery` (late acks, prefetch multiplier 4). "
        f"{args.users:,} users; events started within the last 3 hours; the single, batch and HTTP streams "
        f"send {100 * DUPLICATES:.0f} % of their events twice (events/s counts distinct events).",
        "",
        "## Results",
        "",
        *_table(results),
        "",
        "How it is measured:",
        "",
        "- events/s: Celery paths drain a backlog published before the worker starts (app servers publish from "
        "other machines; here the producer would take the cores the worker needs), from the worker's `ready` "
        "log line to the last event committed. HTTP: the web applies each request's events before it answers "
        "202 (`python -m worker web`, WEB_CONCURRENCY 2, no worker running); 4 client threads post bodies "
        "encoded beforehand as fast as the web answers, from the first request to the last commit. Naive, bare "
        "SQL and PostgreSQL: wall time in the bench process (bare SQL: its arrays built before the clock starts).",
        "- latency, publish to committed with the quota current: the worker writes its `usage_recorded` log "
        "line (with the event ids) after the commit and after publishing the quotas to Redis; its timestamp "
        "minus the time the bench sent the event (same host clock). Measured in a second run into running "
        "workers at half the measured throughput, so it is the path's latency, not time queued behind the "
        "backlog. No-op: Celery's `succeeded` log line. Naive and PostgreSQL: each event's transaction, from "
        "its start to its commit.",
        "- CPU ms per event: CPU time (`/proc/<pid>/stat`) during the throughput run of the processes doing the "
        "work — the worker (main and pool processes), the web, PostgreSQL's backends of the bench database, "
        "Redis, the bench process (the producer in the in-process runs) — per event, and split by process. "
        "Machine CPU: busy time of all cores (`/proc/stat`), which also counts whatever else the shared host ran "
        f"(load average {LOAD_AT_START[0]:.2f} when the run started).",
        "- connection ms per event: time a database connection spends per event — the naive transactions; "
        "for the workers, `worldspeak_usage_commit_seconds` (apply and commit) over the events applied.",
        "- peak RSS: the largest `VmHWM` of the worker's main process and of its pool processes.",
        "",
        "Every run checks the database afterwards: the ledger gained exactly the distinct events sent, and "
        "`usage_events.duration_ms`, `usage_tracking.microphone_ms` and `usage_periods.used_ms` each gained "
        "exactly their milliseconds (the naive and bare SQL baselines write no period totals), with no dead letters. "
        "The run stops with an error otherwise; these figures passed.",
        "",
        "## Targets",
        "",
        *_targets(results, lookups, scaling),
    ]
    lines += ["", "## Scaling: batch path with a pre-loaded ledger", ""]
    if scaling:
        lines += [
            f"Each row: a backlog of {sizes.scale_events:,} events in 1,000-event messages drained by fresh "
            "workers, after the ledger was pre-loaded (with its hourly `usage_tracking` rows, spread over 30 "
            "days) to the size shown. Users on the free plan, each with a subscription and current period.",
            "",
            "| users | ledger rows before | events/s | CPU ms per event | connection ms per event "
            "| peak RSS MiB per pool process |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in scaling:
            lines.append(f"| {row['users']:,} | {row['ledger']:,} | {row['rate']:,.0f} | {row['cpu_ms_per_event']:.3f} "
                         f"| {row['transaction_ms_per_event']:.3f} | {row['peak_mib']:.0f} |")  # fmt: skip
    else:
        lines.append("(left out of this run)")
    lines += [
        "",
        "## Quota look-ups",
        "",
        f"`worker.quota.check(user_id)` from the bench process, {len(lookups):,} look-ups of random users whose "
        f"answers are in Redis: p50 {1000 * harness.percentile(lookups, 0.5):.3f} ms, p99 "
        f"{1000 * harness.percentile(lookups, 0.99):.3f} ms, max {1000 * max(lookups):.3f} ms.",
        *_breakdown(breakdown),
        *_grants(grants, lookups),
    ]
    if NOTES.exists():
        lines += ["", NOTES.read_text().strip()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
