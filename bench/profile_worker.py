"""Where a Celery worker's CPU goes on the batch path: `python -m bench.profile_worker` (a minute or two).

Runs `celery -A worker worker` as bench.run does, on its own database and Redis database, drains a warm-up
backlog, then a measured backlog of 1,000-event messages, and prints the CPU per event of each group of
processes (worker main process, pool processes, PostgreSQL backends, Redis). With --py-spy, the measured
worker runs under `py-spy record --subprocesses` and the samples are summed by function (own time, and
with what they call), per process kind.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import sys
import tempfile
import zlib
from datetime import UTC, datetime
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=20_000, help="events drained before measuring")
    parser.add_argument("--events", type=int, default=60_000, help="events measured")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--py-spy", action="store_true", help="sample the measured worker with py-spy")
    parser.add_argument("--top", type=int, default=45, help="functions shown per process kind")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import harness

    return harness.on_private_redis(lambda: profile(args))


def profile(args: argparse.Namespace) -> int:
    from bench import harness, run

    run_id = f"pw{os.getpid()}"
    redis_db = harness.claim_redis_db(run_id, base_url=harness.REDIS_BASE)
    database = f"ws_bench_{run_id}"
    env = run.environment(run_id, database, redis_db)
    os.environ.update(env)
    log_dir = Path(tempfile.mkdtemp(prefix=f"ws_bench_{run_id}_"))
    from worker import db

    try:
        db.migrate(env["DATABASE_URL"])
        measure(args, env, log_dir, run_id)
    finally:
        db.engine().dispose()
        harness.drop_database(database)
        harness.release_redis(env["REDIS_URL"])
        shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def measure(args: argparse.Namespace, env: dict[str, str], log_dir: Path, run_id: str) -> None:
    from bench import data, harness, phases

    users = data.create_users(args.users, datetime.now(UTC))
    context = phases.Context(env, log_dir, env["REDIS_URL"], run_id, args.concurrency)

    def stream(tag: str, count: int) -> data.Stream:
        return data.make_stream(tag, count, users, datetime.now(UTC), 0.02, seed=zlib.crc32(tag.encode()))

    warmup = stream("warmup", args.warmup)
    phases.celery_path(context, "warmup", phases.batch_messages(warmup), [], warmup, None)
    measured = stream("measured", args.events)
    harness.reset_redis(context.redis_url, context.run_id)
    phases.publish(phases.batch_messages(measured), {})
    samples = log_dir / "py-spy.txt"
    worker = start_worker(context, samples if args.py_spy else None)
    try:
        celery = harness._children(worker.process.pid)[0] if args.py_spy else worker.process.pid
        account = harness.CpuAccount([], context.redis_url, database_name(env))
        pids = harness.process_tree(celery)
        before = {pid: harness._cpu_seconds(pid) or 0.0 for pid in pids}
        completions = harness.Completions([harness.LogReader(worker.log_path)])
        completions.wait_for(measured.unique_ids, timeout=600)
        spent = account.spent()
        spent["worker main"] = (harness._cpu_seconds(celery) or 0.0) - before[celery]
        spent["worker pool"] = sum((harness._cpu_seconds(pid) or 0.0) - before[pid] for pid in pids if pid != celery)
        finished = max(completions.done.values())
    finally:
        if args.py_spy:
            os.kill(celery, signal.SIGTERM)  # py-spy writes its samples once the worker has exited
            worker.process.wait(timeout=60)
        worker.stop()
    events = len(measured.unique_ids)
    seconds = finished - completions.ready_at
    print(f"{events:,} events, {args.users:,} users, {events / seconds:,.0f} events/s")
    for group, cpu in spent.items():
        print(f"  {group:12} {1000 * cpu / events:.4f} ms per event")
    if args.py_spy:
        summarize(samples, args.top)


def database_name(env: dict[str, str]) -> str:
    return env["DATABASE_URL"].rsplit("/", 1)[1]


def start_worker(context, samples: Path | None):
    from bench import harness

    command = [
        sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "usage,stripe,maintenance",
        "-c", str(context.concurrency), "-P", "prefork", "-n", "profile@localhost", "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    if samples:
        py_spy = str(Path(sys.executable).parent / "py-spy")
        command = [py_spy, "record", "--subprocesses", "--rate", "250", "--format", "raw", "-o", str(samples),
                   "--", *command]  # fmt: skip
    return harness.Service("profile", command, context.env, "ready.", context.log_dir)


def summarize(samples: Path, top: int) -> None:
    """py-spy's raw format: one line per distinct stack, `frame;frame;... count`; frames are
    `function (file:line)`, the first is the process."""
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    counts: collections.Counter = collections.Counter()
    if not samples.exists():
        print("py-spy wrote nothing")
        return
    for line in samples.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        kind = _kind(frames)
        n = int(count)
        counts[kind] += n
        names = [_short(frame) for frame in frames[1:]]
        if names:
            own[kind][names[-1]] += n
        for name in set(names):
            total[kind][name] += n
    for kind in sorted(counts):
        print(f"\n== {kind}: {counts[kind]:,} samples")
        print("  own time:")
        for name, n in own[kind].most_common(top):
            print(f"    {100 * n / counts[kind]:5.1f} %  {name}")
        print("  with callees:")
        for name, n in total[kind].most_common(top):
            print(f"    {100 * n / counts[kind]:5.1f} %  {name}")


def _kind(frames: list[str]) -> str:
    text = ";".join(frames)
    if "fast_trace_task" in text or "trace_task" in text or "workloop" in text or "_run_flush" in text:
        return "pool"
    return "main (or idle pool)"


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    for marker in ("site-packages/", "/work/wt/perf/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


if __name__ == "__main__":
    sys.exit(main())
