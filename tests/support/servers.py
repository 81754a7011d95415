"""Private Redis, PostgreSQL and RabbitMQ servers for tests that kill or restart one.

Each server runs on free ports in a temporary directory of its own, never touching the machine's shared
services. `kill()` is SIGKILL (nothing gets to flush or clean up), `start()` after it brings the server
back on the same ports with the data it had on disk, and leaving the context manager removes
everything. `started_in` is how long the last start took, in seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import redis

from bench.harness import free_port

START_TIMEOUT = 60.0  # seconds
STOP_TIMEOUT = 30.0  # seconds
RABBITMQ_SBIN = Path("/usr/lib/rabbitmq/bin")  # the node's own scripts, not the wrappers that switch user
PG_BIN = Path(os.environ.get("TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def wait_for(
    ready: Callable[[], bool], what: str, process: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT} s: {_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-3000:]


def _sigkill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for task in os.listdir(f"/proc/{pid}/task")
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]  # fmt: skip
    except FileNotFoundError:
        return []


def _wait_gone(pid: int) -> None:
    """Until the process is reaped: a zombie still counts as running for PostgreSQL's lock file check."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)


class PrivateRedis:
    """redis-server on a free port; AOF on or off, fsync always or every second."""

    def __init__(self, directory: Path, appendonly: bool, appendfsync: str):
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / "redis.log"
        self.command = [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(directory),
            "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync,
            "--maxmemory-policy", "noeviction", "--logfile", str(self.log),
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None
        self.started_in = 0.0

    def start(self) -> None:
        began = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        wait_for(lambda: _answers(client), "private redis-server", self.process, self.log)
        self.started_in = time.monotonic() - began

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping()) and client.info("persistence").get("loading") == 0
    except redis.RedisError:
        return False


@contextmanager
def private_redis(appendonly: bool = True, appendfsync: str = "always") -> Iterator[PrivateRedis]:
    directory = Path(tempfile.mkdtemp(prefix="ws_redis_"))
    server = PrivateRedis(directory, appendonly, appendfsync)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb, trust authentication) on a free port."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.log = directory / "postgres.log"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/worldspeak"
        self.started_in = 0.0

    def _run(self, *command: str) -> None:
        # PostgreSQL refuses to run as root: as root, run it as the machine's postgres user
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=START_TIMEOUT)
        if done.returncode:
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}{_tail(self.log)}")

    def initdb(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        began = time.monotonic()
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")
        self.started_in = time.monotonic() - began

    def restart(self, immediate: bool = True) -> None:
        """Restart; `immediate` stops without a checkpoint, so the restart replays the WAL as after a crash."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate" if immediate else "fast", "stop")
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, as the kernel's OOM killer would."""
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return
        postmaster = int(pid_file.read_text().split()[0])
        children = _children(postmaster)
        for pid in [postmaster, *children]:
            _sigkill(pid)
        for pid in [postmaster, *children]:
            _wait_gone(pid)

    def stop(self) -> None:
        with suppress(RuntimeError):
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private cluster with the project's schema applied (database `worldspeak`)."""
    from worker import db

    directory = Path(tempfile.mkdtemp(prefix="ws_pg_"))
    server = PrivatePostgres(directory)
    try:
        server.initdb()
        server.start()
        db.migrate(server.url)
        yield server
    finally:
        server.stop()
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


class PrivateRabbitMQ:
    """A second RabbitMQ node (its own name, ports, mnesia and logs; no plugins, no config file)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.node = f"ws_test_{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.log = directory / "server.out"
        home = directory / "home"  # the Erlang cookie the node and rabbitmqctl share
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex)
        cookie.chmod(0o400)
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq-env.conf").write_text("")  # not the machine's, which names the shared node
        self.environ = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_PID_FILE": str(directory / "node.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(directory / "none"),  # no such file: built-in defaults
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "none.config"),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        }
        self.process: subprocess.Popen | None = None
        self.started_in = 0.0

    def ctl(self, *arguments: str) -> str:
        done = subprocess.run(
            [str(RABBITMQ_SBIN / "rabbitmqctl"), "-n", self.node, *arguments],
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 10,
        )
        if done.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(arguments)}: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        began = time.monotonic()
        (self.directory / "node.pid").unlink(missing_ok=True)
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [str(RABBITMQ_SBIN / "rabbitmq-server")],
                env=self.environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: (self.directory / "node.pid").exists(), "private RabbitMQ", self.process, self.log)
        self.ctl("await_startup", "--timeout", str(int(START_TIMEOUT)))
        self.started_in = time.monotonic() - began

    @property
    def pid(self) -> int:
        """The OS process of the Erlang VM (beam.smp)."""
        return int((self.directory / "node.pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL the Erlang VM: no queue gets to write anything more."""
        if self.process is None or self.process.poll() is not None:
            return
        beam = self.pid
        helpers = _children(beam)  # erl_child_setup
        _sigkill(beam)
        _wait_gone(beam)
        for pid in helpers:
            _sigkill(pid)
        self.process.wait(timeout=STOP_TIMEOUT)


@contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    directory = Path(tempfile.mkdtemp(prefix="ws_rabbitmq_"))
    server = PrivateRabbitMQ(directory)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


RABBITMQ_CTL = os.environ.get("TEST_RABBITMQCTL", "rabbitmqctl")  # the machine's, for its shared node
RABBITMQ_BASE = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")


def shared_rabbitmqctl(*arguments: str) -> str:
    """rabbitmqctl on the machine's node; only for this run's vhost (never stop, reset or reconfigure it)."""
    done = subprocess.run([RABBITMQ_CTL, *arguments], capture_output=True, text=True, timeout=START_TIMEOUT)
    if done.returncode:
        raise RuntimeError(f"rabbitmqctl {' '.join(arguments)}: {done.stdout}{done.stderr}")
    return done.stdout


@contextmanager
def shared_rabbitmq_vhost(name: str) -> Iterator[str]:
    """A vhost of its own on the machine's RabbitMQ, for guest, deleted afterwards: the URL of it."""
    shared_rabbitmqctl("add_vhost", name)
    try:
        shared_rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{RABBITMQ_BASE}/{name}"
    finally:
        shared_rabbitmqctl("delete_vhost", name)
