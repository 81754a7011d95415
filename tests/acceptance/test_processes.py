"""The Procfile's processes, started by honcho as the README's first command does, come up and answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.run import ROOT

from bench.harness import free_port


def wait_for_ready(url: str, process: subprocess.Popen, timeout: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "honcho exited early"
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s")


@pytest.mark.slow
def test_web_worker_and_beat_come_up_under_honcho(tmp_path: Path) -> None:
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the Procfile's `python` and `celery`, as bin/run puts them on PATH
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PORT": str(port),
        "WEB_HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "INFO",
    }
    honcho = bin_dir / "honcho"
    log = (tmp_path / "honcho.log").open("w")
    process = subprocess.Popen(
        [str(honcho), "start", "-p", str(port), "web", "worker", "beat"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert wait_for_ready(f"http://127.0.0.1:{port}/healthz", process).status_code == 200
        ready = wait_for_ready(f"http://127.0.0.1:{port}/readyz", process)
        assert ready.json()["status"] == "ready"
        deadline = time.monotonic() + 60
        while True:
            ping = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "worker", "inspect", "ping", "--timeout", "3"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if ping.returncode == 0 or time.monotonic() > deadline:
                break
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "pong" in ping.stdout
        assert "beat: Starting" in (tmp_path / "honcho.log").read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
