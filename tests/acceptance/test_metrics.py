"""Prometheus metrics: summed over processes, counting real traffic through a real worker, fleets cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.factories import insert_user
from support.http_server import serve_in_thread
from support.run import ROOT, TEST_ENV

from worker import db, dead_letters, metrics
from worker.celery import app
from worker.web import app as web_app

AUTH = {"Authorization": "Bearer test-token-1"}
Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(web_app) as url:
        yield url


def scrape(base_url: str) -> Samples:
    response = httpx.get(f"{base_url}/metrics", timeout=15)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def ledger_count() -> int:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return conn.execute("SELECT count(*) FROM usage_events").fetchone()[0]


def wait_for_ledger(count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while ledger_count() != count:
        assert time.monotonic() < deadline, f"the ledger never held {count} events"
        time.sleep(0.1)


def usage_event(user: object, event_id: str, **fields: object) -> dict:
    started = datetime.now(UTC) - timedelta(minutes=10)
    return {"event_id": event_id, "user_id": str(user), "started_at": started.isoformat(), "seconds": 12.5,
            "language": "en", **fields}  # fmt: skip


@pytest.mark.usefixtures("committed")
def test_metrics_count_real_traffic_through_worker_processes(base_url: str, spawn_worker) -> None:
    spawn_worker(concurrency=2)  # prefork: the counting happens in its pool processes
    with db.transaction() as conn:
        user, idle = insert_user(conn), insert_user(conn)
        conn.exec_driver_sql(
            "INSERT INTO maintenance_runs (job, last_succeeded_at) VALUES ('sweep', %s), ('aggregate_usage', NULL)",
            (datetime.now(UTC) - timedelta(seconds=120),),
        )
    before = scrape(base_url)

    good = [usage_event(user, f"h{i}") for i in range(7)]
    over_http = [*good, good[0], usage_event(user, "bad", seconds=0), usage_event(uuid.uuid4(), "nobody")]
    answer = httpx.post(f"{base_url}/v1/usage-events", json={"events": over_http}, headers=AUTH, timeout=15).json()
    assert (len(answer["accepted"]), len(answer["duplicates"]), len(answer["rejected"])) == (7, 1, 2)
    wait_for_ledger(7)
    app.send_task("metering.record_usage_batch", args=[[good[0], usage_event(user, "p1"), usage_event(user, "p2"),
                                                        usage_event(user, "worse", language="")]])  # fmt: skip
    wait_for_ledger(9)
    for _ in range(2):  # nothing cached for this user yet: a miss, then a hit
        assert httpx.get(f"{base_url}/v1/quota/{idle}", headers=AUTH, timeout=15).status_code == 200
    metrics.stripe_event("invoice.paid", "applied")
    after = scrape(base_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("worldspeak_usage_events_total", outcome="accepted") == 9
    assert delta("worldspeak_usage_events_total", outcome="duplicate") == 2  # one in the request, one in the ledger
    assert delta("worldspeak_usage_events_total", outcome="rejected") == 3  # two over HTTP, one by the worker
    assert delta("worldspeak_usage_batch_events_count") == 2
    assert delta("worldspeak_usage_batch_events_sum") == 10 + 4  # the web applies its request as one batch
    assert delta("worldspeak_usage_batch_events_bucket", le="5.0") == 1
    assert delta("worldspeak_usage_commit_seconds_count") == 2
    assert delta("worldspeak_usage_commit_seconds_sum") > 0
    assert delta("worldspeak_quota_cache_lookups_total", result="miss") == 1
    assert delta("worldspeak_quota_cache_lookups_total", result="hit") == 1
    assert delta("worldspeak_stripe_events_total", type="invoice.paid", outcome="applied") == 1
    assert value(after, "worldspeak_dead_letters_pending", source="usage") == 3
    assert delta("worldspeak_dead_letters_total", source="usage") == 3
    assert value(after, "worldspeak_queue_messages", queue="usage") == 0
    assert ("worldspeak_queue_messages", frozenset({("queue", "maintenance")})) in after
    assert 120 <= value(after, "worldspeak_beat_job_seconds_since_success", beat_job="sweep") < 180
    assert value(after, "worldspeak_beat_job_seconds_since_success", beat_job="aggregate_usage") == float("inf")
    assert value(after, "worldspeak_beat_job_seconds_since_success", beat_job="ensure_partitions") == float("inf")
    assert value(after, "worldspeak_beat_job_interval_seconds", beat_job="sweep") == 60
    assert value(after, "worldspeak_dependency_up", dependency="postgresql") == 1
    assert value(after, "worldspeak_dependency_up", dependency="redis") == 1


def test_counts_of_processes_that_have_exited_are_kept(base_url: str) -> None:
    count = "from worker import metrics; metrics.usage_events('duplicate', 5)"
    before = value(scrape(base_url), "worldspeak_usage_events_total", outcome="duplicate")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", count], cwd=ROOT, check=True)
    after = value(scrape(base_url), "worldspeak_usage_events_total", outcome="duplicate")
    assert after - before == 10


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_fleet_start_removes_the_files_of_dead_fleets_of_this_host_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv(metrics.FLEET_VARIABLE, "0")  # restored afterwards
    dead, alive = dead_pid(), os.getpid()
    names = {
        f"counter_{metrics.HOST}-{dead}-{dead}.db": False,
        f"histogram_{metrics.HOST}-{dead}-{dead + 1}.db": False,
        f"counter_{metrics.HOST}-{alive}-{dead}.db": True,  # a pool process that died; its fleet lives on
        f"counter_other-host-{dead}-{dead}.db": True,  # another host's files are its own business
        f"counter_{dead}.db": True,  # not named by this module
    }
    for name in names:
        (tmp_path / name).write_bytes(b"")
    metrics.start_fleet()
    assert {path.name for path in tmp_path.iterdir()} == {name for name, kept in names.items() if kept}
    assert os.environ[metrics.FLEET_VARIABLE] == str(alive)


def test_an_exiting_pool_process_drops_its_live_gauges_and_keeps_its_counts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    me = metrics.process_identifier()
    for name in (f"gauge_livesum_{me}.db", f"counter_{me}.db"):
        (tmp_path / name).write_bytes(b"")
    metrics.process_exited()
    assert [path.name for path in tmp_path.iterdir()] == [f"counter_{me}.db"]


def test_dead_letters_are_counted_only_once_their_transaction_commits(base_url: str) -> None:
    letter = dead_letters.Letter("usage", {"event_id": "x"}, "a reason", "x")
    before = value(scrape(base_url), "worldspeak_dead_letters_total", source="usage")
    with pytest.raises(RuntimeError), db.transaction() as conn:
        dead_letters.write(conn, [letter], datetime.now(UTC))
        raise RuntimeError("rolled back")
    assert value(scrape(base_url), "worldspeak_dead_letters_total", source="usage") == before
    with db.transaction() as conn:
        dead_letters.write(conn, [letter, letter], datetime.now(UTC))
        conn.exec_driver_sql("DELETE FROM dead_letters WHERE ref = 'x'")
    assert value(scrape(base_url), "worldspeak_dead_letters_total", source="usage") == before + 2
