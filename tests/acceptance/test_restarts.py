"""Servers restarted under load: PostgreSQL crash-restarted while workers apply a stream of events, and the
broker killed while app servers post over HTTP. Private servers on free ports; never the shared ones."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from support.factories import insert_user
from support.http_server import serve_in_subprocess
from support.run import TEST_ENV
from support.servers import private_postgres, private_redis
from support.workers import WorkerProcess, producer_app

pytestmark = pytest.mark.slow

SECONDS = (0.5, 1.25, 7, 61.5)  # per event, in turn: exact totals are checked to the millisecond


def events(users: list[str], prefix: str, count: int) -> list[dict]:
    started = datetime.now(UTC) - timedelta(hours=2)
    return [
        {"event_id": f"{prefix}-{i}", "user_id": users[i % len(users)], "seconds": SECONDS[i % len(SECONDS)],
         "started_at": (started + timedelta(seconds=7 * i)).isoformat(), "language": "en"}
        for i in range(count)
    ]  # fmt: skip


def expected_ms(sent: list[dict]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for event in sent:
        totals[event["user_id"]] = totals.get(event["user_id"], 0) + round(event["seconds"] * 1000)
    return totals


def totals(url: str, table: str, column: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT user_id::text, sum({column}) FROM {table} GROUP BY 1").fetchall()
    return {user: int(ms) for user, ms in rows}


def ledger(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [event_id for (event_id,) in conn.execute("SELECT event_id FROM usage_events")]


def wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_postgresql_crash_restarted_mid_stream_loses_and_doubles_nothing(committed) -> None:
    # A broker of its own too, so that only this worker (pointed at the private cluster) takes the stream.
    with private_postgres() as postgres, private_redis(appendonly=False) as broker, producer_app(broker.url) as app:
        with psycopg.connect(postgres.url) as conn:
            users = [str(insert_user(conn)) for _ in range(5)]
            conn.commit()
        worker = WorkerProcess(concurrency=2, env={"DATABASE_URL": postgres.url, "CELERY_BROKER_URL": broker.url})
        try:
            batches = [events(users, f"b{n}", 50) for n in range(40)]
            singles = events(users, "s", 200)
            sent = [event for batch in batches for event in batch] + singles
            for n, batch in enumerate(batches):
                app.send_task("metering.record_usage_batch", args=[batch])
                for single in singles[5 * n : 5 * n + 5]:
                    app.send_task("metering.record_usage", args=[single])
                if n % 10 == 5:
                    postgres.restart(immediate=True)  # as after a crash: the WAL is replayed
            wait_until(lambda: len(ledger(postgres.url)) >= len(sent), "every event in the ledger")
            time.sleep(1)
            stored = ledger(postgres.url)
            assert sorted(stored) == sorted(event["event_id"] for event in sent)  # each once
            assert totals(postgres.url, "usage_periods", "used_ms") == expected_ms(sent)
            assert totals(postgres.url, "usage_tracking", "microphone_ms") == expected_ms(sent)
            with psycopg.connect(postgres.url) as conn:
                assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
            assert worker.process.poll() is None
        finally:
            worker.stop()


def test_the_broker_killed_mid_stream_changes_nothing_over_http(committed) -> None:
    """A 202 is a commit in PostgreSQL: the broker (here Redis, also the quota cache) dying under the
    requests changes none of them."""
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        users = [str(insert_user(conn)) for _ in range(3)]
        conn.commit()
    answered: list[dict] = []
    with private_redis(appendonly=True, appendfsync="always") as broker:
        url = f"redis://127.0.0.1:{broker.port}/0"
        with serve_in_subprocess(REDIS_URL=url, CELERY_BROKER_URL=url) as base_url:
            requests = [events(users, f"h{n}-{uuid.uuid4().hex[:6]}", 20) for n in range(60)]

            def post_all() -> None:
                with httpx.Client(base_url=base_url, timeout=30) as client:
                    for body in requests:
                        response = client.post(
                            "/v1/usage-events", json={"events": body}, headers={"Authorization": "Bearer test-token-1"}
                        )
                        assert response.status_code == 202, response.text
                        answered.append(response.json())

            poster = threading.Thread(target=post_all)
            poster.start()
            for _ in range(3):
                time.sleep(0.3)
                broker.kill()
                broker.start()
            poster.join(120)
    assert len(answered) == len(requests)
    accepted = [event_id for answer in answered for event_id in answer["accepted"]]
    sent = [event for body in requests for event in body]
    assert sorted(accepted) == sorted(event["event_id"] for event in sent)
    assert sorted(ledger(TEST_ENV["DATABASE_URL"])) == sorted(accepted)
    assert totals(TEST_ENV["DATABASE_URL"], "usage_periods", "used_ms") == expected_ms(sent)
