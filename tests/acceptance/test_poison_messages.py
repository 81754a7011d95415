"""Messages a worker cannot take: each becomes a dead letter with its reason and is acknowledged, the worker
lives on, and the good events beside a bad one are applied (a real `celery worker` subprocess)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from kombu import Connection, Exchange, Producer
from support.factories import insert_user
from support.run import TEST_ENV

from worker import db
from worker.celery import app
from worker.config import settings

pytestmark = pytest.mark.usefixtures("committed")


def rows(query: str) -> list[tuple]:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return conn.execute(query).fetchall()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def nested(depth: int) -> object:
    value: object = 1
    for level in range(depth):
        value = [value] if level % 2 else {"x": value}
    return value


def usage(user: uuid.UUID, event_id: str, **fields: object) -> dict:
    started = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    return {"event_id": event_id, "user_id": str(user), "started_at": started, "seconds": 2, "language": "en", **fields}


def letters() -> dict[str | None, tuple]:
    return {ref: (source, reason) for ref, source, reason in rows("SELECT ref, source, reason FROM dead_letters")}


def publish_raw(body: bytes, content_type: str, task: str = "metering.record_usage_batch") -> str:
    """A message as a broken or foreign producer would send it, straight to the usage queue."""
    message_id = str(uuid.uuid4())
    with Connection(settings().redis_url) as connection:
        Producer(connection).publish(
            body,
            exchange=Exchange("usage", type="direct"),
            routing_key="usage",
            content_type=content_type,
            content_encoding="utf-8",
            headers={"task": task, "id": message_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    return message_id


def test_poison_messages_are_dead_lettered_and_the_worker_lives_on(spawn_worker) -> None:
    worker = spawn_worker(concurrency=1)
    with db.transaction() as conn:
        user = insert_user(conn)
    deep = usage(user, "deep", seconds=nested(400))

    app.send_task("metering.record_usage_batch", args=[[usage(user, "beside-1"), deep, usage(user, "beside-2")]])
    app.send_task("metering.record_usage", args=[usage(user, "deep-single", language=nested(600))])
    app.send_task("stripe.process_event", args=[nested(500)])
    app.send_task("no.such.task", args=[1])
    not_json = publish_raw(b'[[{"event_id": "half', "application/json")
    pickled = publish_raw(b"\x80\x04K\x01.", "application/x-python-serialize")
    app.send_task("metering.record_usage_batch", args=[[usage(user, "after-all")]])

    wait_until(lambda: len(rows("SELECT 1 FROM usage_events")) == 3, "the good events")
    wait_until(lambda: len(letters()) == 6, "six dead letters")
    recorded = {event_id for (event_id,) in rows("SELECT event_id FROM usage_events")}
    assert recorded == {"beside-1", "beside-2", "after-all"}
    found = letters()
    assert found["deep"] == ("usage", "event nested deeper than 30 levels")
    assert found["deep-single"][0] == "usage" and "nested deeper" in found["deep-single"][1]
    reasons = sorted(reason for source, reason in found.values())
    assert any(reason.startswith("message nested deeper than") for reason in reasons)  # the Stripe one
    assert any(reason.startswith("no task named 'no.such.task'") for reason in reasons)
    assert found[not_json][1].startswith("message cannot be decoded")
    assert found[pickled][1].startswith(("message cannot be decoded", "invalid task message"))
    assert worker.process.poll() is None, "the worker died"


def test_a_letter_that_cannot_be_written_sends_the_message_back(spawn_worker, tmp_path) -> None:
    """PostgreSQL unreachable: the poison message is not acknowledged without its letter; once the database
    answers again (here: the next worker, pointed at it) the letter is written."""
    blackhole = "postgresql://postgres@127.0.0.1:1/nowhere"
    broken = spawn_worker(concurrency=1, env={"DATABASE_URL": blackhole})
    app.send_task("metering.record_usage_batch", args=[[nested(100)]])
    time.sleep(3)  # the broken worker takes it, cannot write the letter, and puts it back
    assert broken.process.poll() is None
    broken.stop()
    spawn_worker(concurrency=1)
    wait_until(lambda: len(letters()) == 1, "the letter, written by a worker that reaches PostgreSQL")
    (source, reason), *_ = letters().values()
    assert source == "usage" and "nested deeper" in reason
    assert json.loads(json.dumps(rows("SELECT payload FROM dead_letters")[0][0]))["unstorable"]
