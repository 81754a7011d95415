"""A worker that stops answering in the middle of a batch (SIGSTOP, as a paused VM or a stuck process) must
not stall everyone: PostgreSQL ends its idle transaction after PG_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
releasing its row locks, the others go on, and after it resumes its batch is applied once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from support.factories import insert_user
from support.run import TEST_ENV

from worker import db
from worker.celery import app

pytestmark = [pytest.mark.usefixtures("committed"), pytest.mark.slow]

# The stopped batch waits at the gate longer than the test takes to start the second worker; the idle
# timeout is what ends it.
TIMEOUTS = {"PG_LOCK_TIMEOUT_SECONDS": "60", "PG_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": "3"}


def scalar(query: str, *params: object) -> object:
    with psycopg.connect(TEST_ENV["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute(query, params).fetchone()[0]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def events(user: uuid.UUID, prefix: str, count: int) -> list[dict]:
    started = datetime.now(UTC) - timedelta(hours=1)
    return [
        {"event_id": f"{prefix}-{i}", "user_id": str(user), "started_at": (started + timedelta(seconds=i)).isoformat(),
         "seconds": 1.5, "language": "en"}
        for i in range(count)
    ]  # fmt: skip


def pool_child(main_pid: int) -> int:
    children = subprocess.run(["pgrep", "-P", str(main_pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, f"expected one pool process, found {children}"
    return int(children[0])


def backend_waiting_on_a_lock(application_pid: int) -> bool:
    return bool(
        scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            f"worldspeak-worker:{application_pid}",
        )
    )


def test_a_paused_worker_is_cut_off_the_others_go_on_and_its_batch_counts_once(spawn_worker) -> None:
    with db.transaction() as conn:
        shared, gate = insert_user(conn), insert_user(conn)
    # Both users' periods exist before the race, so the paused batch holds the shared user's rows.
    app.send_task("metering.record_usage_batch", args=[events(shared, "warm", 1) + events(gate, "warm-g", 1)])
    paused = spawn_worker(concurrency=1, env=TIMEOUTS)
    wait_until(lambda: scalar("SELECT count(*) FROM usage_events") == 2, "the warm-up batch")
    child = pool_child(paused.process.pid)

    # The test holds the gate user's period row: the batch has written (and locked) both users' hours of
    # usage_tracking when it comes to wait here. While it waits, its process is stopped; then the gate opens.
    holder = psycopg.connect(TEST_ENV["DATABASE_URL"])
    holder.execute("SELECT 1 FROM usage_periods WHERE user_id = %s FOR UPDATE", (gate,))
    app.send_task("metering.record_usage_batch", args=[events(shared, "paused", 200) + events(gate, "paused-g", 200)])
    wait_until(lambda: backend_waiting_on_a_lock(child), "the batch to wait on the gate")
    stopped = [paused.process.pid, child]  # the whole worker: a stopped main process prefetches nothing more
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        other = spawn_worker(concurrency=1, env=TIMEOUTS)
        holder.rollback()  # the stopped batch now holds every row it wanted, and cannot go on
        holder.close()
        released = time.monotonic()
        app.send_task("metering.record_usage_batch", args=[events(shared, "other", 50)])
        wait_until(lambda: scalar("SELECT count(*) FROM usage_events WHERE event_id LIKE 'other-%%'") == 50,
                   "the other worker's batch", timeout=30)  # fmt: skip
        waited = time.monotonic() - released
        assert other.process.poll() is None
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)

    wait_until(lambda: scalar("SELECT count(*) FROM usage_events") == 2 + 400 + 50, "the paused batch, retried")
    expected_ms = {shared: (1 + 200 + 50) * 1500, gate: (1 + 200) * 1500}
    for user, ms in expected_ms.items():
        assert scalar("SELECT sum(used_ms) FROM usage_periods WHERE user_id = %s", user) == ms
        assert scalar("SELECT sum(microphone_ms) FROM usage_tracking WHERE user_id = %s", user) == ms
    assert scalar("SELECT count(*) FROM dead_letters") == 0
    # The other batch waited for the stopped one's rows until PostgreSQL cut it off (3 s), not longer.
    assert 2.5 < waited < 20
