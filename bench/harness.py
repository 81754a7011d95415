"""What the benchmark runs on: its own databases and Redis database, worker and web subprocesses, their
logs (where committed events are read from), their peak memory, and the machine's CPU time."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
REDIS_BASE = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
# The tests' claim key: a Redis database holding it belongs to one run, so the suite and the bench never
# flush each other's queues.
REDIS_LOCK_KEY = "worldspeak-test-run"
INGEST_TOKEN = "bench-token"


# -- services ----------------------------------------------------------------------------------------------


def database_url(name: str) -> str:
    return f"{PG_BASE}/{name}"


def recommended_settings() -> dict[str, str]:
    """The PostgreSQL settings the README recommends to operators (its PostgreSQL section), for this
    machine: shared_buffers a quarter of the memory (PostgreSQL's own guidance) so the indexes every batch
    writes into stay in PostgreSQL's cache, and WAL room for a checkpoint every 15 minutes rather than
    every gigabyte (each first write of a page after a checkpoint logs the whole page)."""
    memory_mib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {"shared_buffers": f"{memory_mib // 4}MB", "max_wal_size": "8GB", "checkpoint_timeout": "15min"}


class PrivatePostgres:
    """A PostgreSQL cluster of the bench's own: initdb in a temporary directory (as the postgres user),
    started on a free port with `settings`, stopped and removed afterwards. The shared server's
    configuration is never touched."""

    def __init__(self, settings: dict[str, str], port: int) -> None:
        self.settings, self.port = settings, port
        self.bindir = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                          check=True).stdout.strip())  # fmt: skip
        self.directory = Path(tempfile.mkdtemp(prefix="ws_bench_pg_"))
        self.data = self.directory / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True)

    def __enter__(self) -> PrivatePostgres:
        shutil.chown(self.directory, "postgres")
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                          "-E", "UTF8", "--locale=C.UTF-8")  # fmt: skip
        options = " ".join(f"-c {name}={value}" for name, value in {
            "port": str(self.port), "listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.directory),
            **self.settings,
        }.items())  # fmt: skip
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "log"),
                          "-o", options, "-w", "start")  # fmt: skip
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def drop_database(name: str) -> None:
    with psycopg.connect(database_url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def on_private_redis(work: Callable[[], int]) -> int:
    """`work()` with REDIS_BASE a redis-server of its own: the shared server may have no free database."""
    global REDIS_BASE
    with PrivateRedis(free_port()) as private_redis:
        REDIS_BASE = private_redis.url
        return work()


class PrivateRedis:
    """A redis-server of the bench's own on a free port, without persistence (as the tests' private ones),
    stopped when the block ends: the bench never needs a free database of the shared server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="ws_bench_redis_"))
        self.url = f"redis://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> PrivateRedis:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the bench's redis-server did not start") from None
                time.sleep(0.05)

    def __exit__(self, *_exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
        shutil.rmtree(self.directory, ignore_errors=True)


def claim_redis_db(run_id: str, numbers: Iterable[int] = range(15, 0, -1), base_url: str = REDIS_BASE) -> int:
    """The first empty Redis database among `numbers`, claimed with a lock key holding `run_id` (which
    starts with the run's pid). The test suite claims its own the same way (from 1 up; the bench from 15
    down), so no two runs share one. A database claimed by a run whose process is gone (killed, or a run
    that never reached its teardown) is emptied and claimed again."""
    numbers = list(numbers)
    for number in numbers:
        client = redis.Redis.from_url(f"{base_url}/{number}")
        if client.set(REDIS_LOCK_KEY, run_id, nx=True, ex=3 * 3600):
            if client.dbsize() == 1:
                return number
            client.delete(REDIS_LOCK_KEY)
    for number in numbers:
        client = redis.Redis.from_url(f"{base_url}/{number}")
        owner = client.get(REDIS_LOCK_KEY)
        pid = owner.split(b"_")[0] if owner is not None else b""
        if pid.isdigit() and not _alive(int(pid)):
            client.flushdb()
            if client.set(REDIS_LOCK_KEY, run_id, nx=True, ex=3 * 3600):
                return number
    raise RuntimeError("no empty Redis database among 1-15: stale runs? `redis-cli -n N flushdb` frees one")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def reset_redis(redis_url: str, run_id: str) -> None:
    """Empty a claimed Redis database (queues, unacked messages, quota answers), keep the claim, and
    declare the queues again: kombu keeps exchange bindings in Redis and a producer declares them only
    once per process, so without this the next messages would vanish."""
    from worker.celery import app

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.set(REDIS_LOCK_KEY, run_id, ex=3 * 3600)
    with app.connection_for_write() as connection:
        for queue in app.amqp.queues.values():
            queue(connection.default_channel).declare()


def release_redis(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()


# -- processes ---------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    tree = [pid]
    for child in _children(pid):
        tree += process_tree(child)
    return tree


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the most resident memory the process has had since it started."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class Service:
    """A subprocess (a Celery worker or the web) with its log file and the peak memory of its processes."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], ready: str, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.peaks: dict[int, int] = {}  # pid -> VmHWM KiB
        self._wait_for(ready)

    def _wait_for(self, marker: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            if marker in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def sample_memory(self) -> None:
        for pid in process_tree(self.process.pid):
            peak = peak_rss_kib(pid)
            if peak is not None:
                self.peaks[pid] = max(peak, self.peaks.get(pid, 0))

    def memory(self) -> MemoryPeaks:
        main = self.peaks.get(self.process.pid, 0)
        children = [kib for pid, kib in self.peaks.items() if pid != self.process.pid]
        return MemoryPeaks(main_mib=main / 1024, child_mib=max(children, default=0) / 1024, processes=len(self.peaks))

    def stop(self) -> None:
        self.sample_memory()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the pool or uvicorn's children too
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@dataclass
class MemoryPeaks:
    main_mib: float
    child_mib: float
    processes: int


def start_worker(
    name: str, env: dict[str, str], log_dir: Path, concurrency: int, include: str | None = None, app: str = "worker"
) -> Service:
    """`celery -A worker worker` as the Procfile runs it (all three queues, INFO logs), prefork."""
    command = [
        sys.executable, "-m", "celery", "-A", app, "worker", "-Q", "usage,stripe,maintenance",
        "-c", str(concurrency), "-P", "prefork", "-n", f"{name}@localhost", "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    if include:
        command += ["--include", include]
    return Service(name, command, env, "ready.", log_dir)


def start_web(env: dict[str, str], log_dir: Path) -> Service:
    return Service("web", [sys.executable, "-m", "worker", "web"], env, "Application startup complete", log_dir)


class MemoryWatch:
    """Samples the peak memory of the given services every 0.2 s while the block runs."""

    def __init__(self, *services: Service) -> None:
        self.services = services
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for service in self.services:
                service.sample_memory()

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for service in self.services:
            service.sample_memory()


# -- what the logs say -------------------------------------------------------------------------------------

NOOP_DONE = re.compile(r"^Task bench\.noop\[(?P<id>[^\]]+)\] succeeded")


def log_time(line: dict) -> float:
    """The Unix time of a JSON log line (structlog's ISO timestamp, UTC, microseconds)."""
    return datetime.fromisoformat(line["timestamp"]).timestamp()


class LogReader:
    """Reads the complete JSON lines a service appended since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def lines(self) -> Iterator[dict]:
        with self.path.open("rb") as file:
            file.seek(self._offset)
            data = file.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for raw in data[:end].splitlines():
            if raw.startswith(b"{"):
                try:
                    yield json.loads(raw)
                except ValueError:
                    continue


@dataclass
class Completions:
    """When each event (or no-op message) was done, read from the workers' logs.

    A metering event is done at its `usage_recorded` line, which the worker writes after the transaction
    committed and the quota of every user in it was published to Redis; a no-op message at Celery's
    `succeeded` line."""

    readers: list[LogReader]
    done: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    rejected: int = 0
    ready_at: float | None = None

    def poll(self) -> None:
        for reader in self.readers:
            for line in reader.lines():
                self._read(line)

    def _read(self, line: dict) -> None:
        event = line.get("event", "")
        if event == "usage_recorded":
            if "event_ids" not in line:
                raise RuntimeError("usage_recorded log lines no longer name their event_ids; the bench reads them")
            at = log_time(line)
            for event_id in line["event_ids"]:
                self.done.setdefault(event_id, at)
            self.duplicates += line.get("duplicates", 0)
            self.rejected += line.get("rejected", 0)
        elif isinstance(event, str) and event.endswith(" ready."):
            at = log_time(line)
            self.ready_at = at if self.ready_at is None else max(self.ready_at, at)
        elif isinstance(event, str) and (match := NOOP_DONE.match(event)):
            self.done.setdefault(match["id"], log_time(line))

    def wait_for(self, ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if self.rejected:
                raise RuntimeError(f"the workers rejected {self.rejected} events (see dead_letters)")
            if ids <= self.done.keys():
                return
            if time.monotonic() > deadline:
                missing = len(ids - self.done.keys())
                raise RuntimeError(f"{missing} of {len(ids)} events not committed after {timeout}s")
            time.sleep(0.05)


# -- CPU time and statistics -------------------------------------------------------------------------------


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores; idle and iowait excluded)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuAccount:
    """CPU time of the processes doing the work, by group: the bench's services (their process trees),
    PostgreSQL's backends of the bench's database, Redis, and the bench process itself. Other work on the
    host (the machine is shared) is left out, unlike `machine_cpu_seconds`."""

    def __init__(self, services: list[Service], redis_url: str, database: str) -> None:
        self.services = services
        self.redis_url = redis_url
        self.database = database
        self._start = self._snapshot()

    def _backends(self) -> list[int]:
        with psycopg.connect(database_url("postgres"), autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,)).fetchall()
        return [row[0] for row in rows]

    def _snapshot(self) -> dict[str, dict[int, float]]:
        groups = {service.name: process_tree(service.process.pid) for service in self.services}
        groups["postgresql"] = self._backends()
        groups["bench"] = [os.getpid()]
        snapshot = {group: {pid: _cpu_seconds(pid) or 0.0 for pid in pids} for group, pids in groups.items()}
        info = redis.Redis.from_url(self.redis_url).info("cpu")
        snapshot["redis"] = {0: info["used_cpu_sys"] + info["used_cpu_user"]}
        return snapshot

    def spent(self) -> dict[str, float]:
        """CPU seconds each group spent since this account was opened."""
        end = self._snapshot()
        return {
            group: sum(seconds - self._start.get(group, {}).get(pid, 0.0) for pid, seconds in pids.items())
            for group, pids in end.items()
        }


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]
