"""Every route of the web process over real HTTP: success and each error status."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from support.factories import insert_user
from support.http_server import black_hole, free_port, serve_in_subprocess, serve_in_thread
from support.run import TEST_ENV, environment

from worker import db, ingest
from worker.logs import get_logger
from worker.web import app

pytestmark = pytest.mark.usefixtures("committed")

TOKEN = "test-token-2"  # the second configured token: every token is accepted, not only the first
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=15) as http:
        yield http


def make_user(**profile: object) -> str:
    with db.transaction() as conn:
        return str(insert_user(conn, **profile))


def event(user: str, event_id: str, **fields: object) -> dict:
    started = datetime.now(UTC) - timedelta(minutes=5)
    return {"event_id": event_id, "user_id": user, "started_at": started.isoformat(), "seconds": 30, "language": "en",
            **fields}  # fmt: skip


def query(sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return conn.execute(sql, params).fetchall()


def wait_for(sql: str, expected: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while query(sql)[0][0] != expected:
        assert time.monotonic() < deadline, f"{sql} never became {expected!r}"
        time.sleep(0.1)


# -- health --------------------------------------------------------------------------------------------


def test_healthz_answers_ok(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.text) == (200, "ok")


def test_readyz_is_ready_when_postgresql_and_redis_answer(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


def test_readyz_names_what_is_down_within_its_timeout() -> None:
    with black_hole() as hung_port:
        dead = {
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{hung_port}/x",
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        }
        with serve_in_subprocess(**dead) as url:
            started = time.monotonic()
            response = httpx.get(f"{url}/readyz", timeout=15)
            elapsed = time.monotonic() - started
    assert response.status_code == 503
    down = response.json()["down"]
    assert down["postgresql"] == "no answer within 2.0 s"
    assert down["redis"].startswith("ConnectionError")
    assert elapsed < 4


def test_metrics_are_prometheus_text(client: httpx.Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert 'worldspeak_dependency_up{dependency="postgresql"} 1.0' in response.text
    assert 'worldspeak_queue_messages{queue="usage"}' in response.text


# -- POST /v1/usage-events -----------------------------------------------------------------------------


def test_an_accepted_event_is_committed_before_the_answer(client: httpx.Client) -> None:
    user = make_user()
    response = client.post("/v1/usage-events", json=event(user, "one"), headers=AUTH)
    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (["one"], [], [])
    assert query("SELECT count(*) FROM usage_events WHERE event_id = 'one'") == [(1,)]  # no worker involved
    again = client.post("/v1/usage-events", json=event(user, "one"), headers=AUTH).json()
    assert (again["accepted"], again["duplicates"]) == ([], ["one"])


def test_each_event_of_a_batch_gets_its_own_answer(client: httpx.Client) -> None:
    user = make_user()
    unknown = str(uuid.uuid4())
    events = [
        event(user, "fine-1"),
        event(user, "bad-seconds", seconds=-1),
        event(unknown, "nobody"),
        event(user, "fine-1"),  # repeated within the request
        "not an object",
        event(user, "fine-2", conversation_id=str(uuid.uuid4()), feature="pronunciation_check"),
        event(user, "no-offset", started_at="2027-01-01T10:00:00"),
    ]
    response = client.post("/v1/usage-events", json={"events": events}, headers=AUTH)
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == ["fine-1", "fine-2"]
    assert body["duplicates"] == ["fine-1"]
    assert [(r["index"], r["event_id"]) for r in body["rejected"]] == [
        (1, "bad-seconds"), (2, "nobody"), (4, None), (6, "no-offset"),
    ]  # fmt: skip
    reasons = {r["index"]: r["reason"] for r in body["rejected"]}
    assert reasons[1] == "seconds must be > 0, got -1"
    assert reasons[2] == f"unknown user_id {unknown}"
    assert reasons[4] == "event must be a JSON object, got str"
    assert "no UTC offset" in reasons[6]
    letters = query("SELECT ref, reason, task_name FROM dead_letters ORDER BY id")
    assert letters == [
        ("bad-seconds", reasons[1], ingest.ROUTE), ("nobody", reasons[2], ingest.ROUTE),
        (None, reasons[4], ingest.ROUTE), ("no-offset", reasons[6], ingest.ROUTE),
    ]  # fmt: skip
    assert query("SELECT count(*) FROM usage_events") == [(2,)]  # committed before the answer


MALFORMED_BODIES = [
    (b"{not json", "body is not JSON"),
    (b"\xff\xfe", "body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "body is not JSON"),
    (b"[]", "body must be a JSON object"),
    (b'"text"', "body must be a JSON object"),
    (b'{"events": []}', "events must be a list of 1 to 1000"),
    (b'{"events": {"a": 1}}', "events must be a list of 1 to 1000"),
    (json.dumps({"events": [{}] * 1001}).encode(), "events must be a list of 1 to 1000"),
    (b'{"events": [{}], "user_id": "x"}', "has no other keys; got 'user_id'"),
]


def test_a_body_of_the_wrong_shape_is_a_400(client: httpx.Client) -> None:
    for body, reason in MALFORMED_BODIES:
        response = client.post("/v1/usage-events", content=body, headers=AUTH)
        assert response.status_code == 400, body[:50]
        assert reason in response.json()["error"], body[:50]
    assert query("SELECT count(*) FROM dead_letters") == [(0,)]


def test_a_body_over_the_limit_is_a_413_whether_or_not_its_length_is_declared(client: httpx.Client) -> None:
    too_big = b" " * (ingest.MAX_BODY_BYTES + 1)
    declared = client.post("/v1/usage-events", content=too_big, headers=AUTH)
    streamed = client.post("/v1/usage-events", content=iter([too_big[:1000], too_big[1000:]]), headers=AUTH)
    for response in (declared, streamed):
        assert response.status_code == 413
        assert "larger than" in response.json()["error"]
    full = {"events": [event(str(uuid.uuid4()), f"{'x' * 120}-{i:05d}") for i in range(1000)]}
    assert len(json.dumps(full)) < ingest.MAX_BODY_BYTES  # a full batch of long ids fits
    assert client.post("/v1/usage-events", json=full, headers=AUTH).status_code == 202


UNAUTHORIZED = [
    ({}, "Bearer"),
    ({"Authorization": f"Basic {TOKEN}"}, "Bearer"),
    ({"Authorization": "Bearer"}, "Bearer"),
    ({"Authorization": "Bearer test-token-3"}, 'Bearer error="invalid_token"'),
    ({"Authorization": "Bearer test-token-1x"}, 'Bearer error="invalid_token"'),
    ({"Authorization": "Bearer tëst".encode()}, 'Bearer error="invalid_token"'),
]


def test_without_a_valid_token_both_routes_are_a_401(client: httpx.Client) -> None:
    user = make_user()
    for headers, challenge in UNAUTHORIZED:
        for response in (
            client.post("/v1/usage-events", json=event(user, "x"), headers=headers),
            client.get(f"/v1/quota/{user}", headers=headers),
        ):
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == challenge
    assert query("SELECT count(*) FROM dead_letters") == [(0,)]


def test_without_configured_tokens_both_routes_are_a_503_that_says_why(client: httpx.Client) -> None:
    user = make_user()
    with environment(INGEST_API_TOKENS=""):
        responses = [
            client.post("/v1/usage-events", json=event(user, "x"), headers=AUTH),
            client.get(f"/v1/quota/{user}", headers=AUTH),
        ]
    for response in responses:
        assert response.status_code == 503
        assert "INGEST_API_TOKENS is empty" in response.json()["error"]


def test_other_methods_are_a_405(client: httpx.Client) -> None:
    assert client.get("/v1/usage-events", headers=AUTH).status_code == 405
    assert client.post(f"/v1/quota/{uuid.uuid4()}", headers=AUTH).status_code == 405


# -- GET /v1/quota/{user_id} -----------------------------------------------------------------------------


def test_quota_of_a_user(client: httpx.Client) -> None:
    user = make_user()
    response = client.get(f"/v1/quota/{user}", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert {key: body[key] for key in ("user_id", "plan", "limit_seconds", "used_seconds", "blocked")} == {
        "user_id": user, "plan": "free", "limit_seconds": 3600, "used_seconds": 0, "blocked": False,
    }  # fmt: skip
    assert set(body) == {"user_id", "plan", "limit_seconds", "used_seconds", "remaining_seconds", "reserved_seconds",
                         "blocked", "period_start", "period_end"}  # fmt: skip


def test_quota_of_a_malformed_id_is_a_400_and_of_an_unknown_user_a_404(client: httpx.Client) -> None:
    malformed = client.get("/v1/quota/not-a-uuid", headers=AUTH)
    assert (malformed.status_code, malformed.json()["error"]) == (400, "user_id is not a UUID: 'not-a-uuid'")
    unknown = uuid.uuid4()
    missing = client.get(f"/v1/quota/{unknown}", headers=AUTH)
    assert (missing.status_code, missing.json()["error"]) == (404, f"no user with id {unknown}")


# -- outages ---------------------------------------------------------------------------------------------


def test_with_redis_down_ingest_still_commits_and_quota_and_metrics_answer() -> None:
    user = make_user()
    with serve_in_subprocess(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") as url:
        bad_and_good = {"events": [event(user, "good"), event(user, "bad", seconds=0)]}
        ingest_response = httpx.post(f"{url}/v1/usage-events", json=bad_and_good, headers=AUTH, timeout=30)
        quota_response = httpx.get(f"{url}/v1/quota/{user}", headers=AUTH, timeout=30)
        ready = httpx.get(f"{url}/readyz", timeout=30)
        scrape = httpx.get(f"{url}/metrics", timeout=30)
    assert ingest_response.status_code == 202  # the events are in PostgreSQL: Redis only caches answers
    assert [r["index"] for r in ingest_response.json()["rejected"]] == [1]
    assert query("SELECT event_id FROM usage_events") == [("good",)]
    assert query("SELECT count(*) FROM dead_letters") == [(1,)]
    assert quota_response.status_code == 200  # from PostgreSQL
    assert (ready.status_code, list(ready.json()["down"])) == (503, ["redis"])
    assert scrape.status_code == 200  # what can be read still is
    assert 'worldspeak_dependency_up{dependency="redis"} 0.0' in scrape.text
    assert 'worldspeak_dependency_up{dependency="postgresql"} 1.0' in scrape.text


# -- logs ------------------------------------------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_logs_are_json_with_event_and_task_ids_and_never_a_token(client: httpx.Client) -> None:
    root = logging.getLogger()
    collect = Collect(root.handlers[0].formatter)
    root.addHandler(collect)
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        user = make_user()
        client.post("/v1/usage-events", json={"events": [event(user, "logged"), event(user, "bad", seconds="x")]},
                    headers=AUTH)  # fmt: skip
        client.post("/v1/usage-events", json=event(user, "x"), headers={"Authorization": "Bearer wrong-secret"})
        client.get(f"/v1/quota/{user}", headers=AUTH)
        get_logger("test").info("careless", token=TOKEN, authorization=f"Bearer {TOKEN}")
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
    records = [json.loads(line) for line in collect.lines]
    assert all(TOKEN not in line and "wrong-secret" not in line for line in collect.lines)
    recorded = next(r for r in records if r["event"] == "usage_recorded")
    assert recorded["event_ids"] == ["logged"] and recorded["origin"] == "POST /v1/usage-events"
    assert next(r for r in records if r["event"] == "dead_lettered")["ref"] == "bad"
    assert any(r["event"] == "unauthorized" for r in records)
    assert next(r for r in records if r["event"] == "careless")["token"] == "[redacted]"
