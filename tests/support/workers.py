"""Real Celery workers as subprocesses (what production runs, and what tests kill), and producers that
publish to a broker of the test's choosing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.run import ROOT, environment


class WorkerProcess:
    """`celery worker` as a subprocess: what production runs, and what tests kill with SIGKILL."""

    def __init__(
        self, concurrency: int = 2, env: dict[str, str] | None = None, queues: str = "usage,stripe,maintenance"
    ):
        self.hostname = f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.log_path = Path(f"/tmp/{self.hostname.split('@')[0]}.log")
        command = [
            sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queues, "-c", str(concurrency),
            "-n", self.hostname, "--without-gossip", "--without-mingle", "-l", "INFO",
        ]  # fmt: skip
        self.log_file = self.log_path.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "LOG_LEVEL": "INFO", **(env or {})},  # INFO: the "ready." line tells us it is up
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            self.wait_ready()
        except Exception:
            self.kill()
            raise

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
            if "ready." in self.log_path.read_text():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the main process and its pool children: nothing gets to acknowledge or clean up."""
        subprocess.run(["pkill", "-KILL", "-P", str(self.process.pid)], check=False)
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log_file.close()


@contextmanager
def producer_app(broker_url: str) -> Iterator[Any]:
    """A Celery app of this process that publishes to `broker_url` (tasks are sent by name)."""
    from worker.celery import app, create_app

    with environment(CELERY_BROKER_URL=broker_url):
        producer = create_app()
    app.set_current()  # a new Celery app makes itself the current one
    try:
        yield producer
    finally:
        producer.close()


@dataclass(frozen=True)
class Broker:
    name: str
    env: dict[str, str]  # for worker subprocesses
    app: Any  # the Celery app producers in the test process publish with


def purge_queues(app: Any) -> None:
    with app.connection_for_write() as connection:
        for queue in app.conf.task_queues:
            bound = queue(connection.default_channel)
            bound.declare()
            bound.purge()
