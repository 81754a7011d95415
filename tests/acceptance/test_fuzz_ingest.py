"""Property-based fuzzing of both ways usage comes in: `POST /v1/usage-events` over real HTTP, and
messages sent with `send_task` to a real prefork worker.

Bodies and events are drawn at random: random JSON, wrong types, huge numbers, deep nesting, NUL and lone
surrogates in keys and values, trailing newlines, bodies of 10 MB. Whatever arrives: never a 5xx and
never a dead worker; every event of a request is answered once (accepted, duplicate or rejected with a
reason); every rejection is a dead letter with the same reason; every good event is stored byte for byte.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support.factories import insert_user
from support.http_server import serve_in_thread
from support.run import TEST_ENV, clear_data

from worker import db
from worker.celery import app
from worker.metering.events import to_ms
from worker.web import app as web_app

AUTH = {"Authorization": "Bearer test-token-1"}


def fuzzing(examples: int, shrink: bool = True) -> settings:
    """Settings of a fuzz test; `shrink=False` for tests whose examples each take seconds (a failure is
    reported as drawn: shrinking it would take minutes)."""
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.reuse, Phase.generate)
    return settings(
        max_examples=examples,
        phases=phases,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- what is drawn ---------------------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20)
HOSTILE_TEXT = st.sampled_from(["x\x00y", "\ud800", "a\udfff", "en\n", "\n", "", " ", "\t", "\u2028", "null"])
STORABLE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


def nested(depth: int) -> object:
    value: object = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@st.composite
def good_event(draw: st.DrawFn, user: str) -> dict:
    now = datetime.now(UTC)
    started = now - timedelta(milliseconds=draw(st.integers(1000, 20 * 86_400_000)))
    offset = draw(st.sampled_from(["Z", "+00:00", "+05:30", "-03:30", "+09:45"]))
    if offset == "Z":
        started_at = started.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
    else:
        sign = 1 if offset[0] == "+" else -1
        shift = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])) * sign
        started_at = (started + shift).strftime("%Y-%m-%dT%H:%M:%S.%f") + offset
    event = {
        "event_id": draw(st.text(STORABLE, min_size=1, max_size=128)),
        "user_id": user,
        "started_at": started_at,
        "seconds": draw(st.integers(1, 14400) | st.decimals("0.001", "14400", places=3).map(float)),
        "language": draw(st.sampled_from(["en", "zh", "pt-BR", "ja", "zh-Hant-TW"])),
    }
    if draw(st.booleans()):
        event["conversation_id"] = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
    if draw(st.booleans()):
        event["feature"] = draw(st.from_regex(r"[a-z][a-z0-9_.:-]{0,20}", fullmatch=True))
    return event


# A mutation that certainly makes an event invalid: (field, value) pairs, None meaning "remove the field".
CERTAINLY_BAD = st.one_of(
    st.tuples(st.sampled_from(["user_id", "conversation_id"]), st.sampled_from(["not-a-uuid", "\ud800"]))
    | st.tuples(st.sampled_from(["user_id", "language", "conversation_id", "feature"]), st.just("\n")),
    st.tuples(st.sampled_from(["language", "feature", "started_at"]), HOSTILE_TEXT.filter(lambda t: t != "null")),
    st.tuples(st.just("seconds"), st.sampled_from([0, -1, 14401, 10**40, "30", True, None, [1], {"s": 1}])),
    st.tuples(st.just("started_at"), st.sampled_from(["2027-01-01T00:00:00", "yesterday", 1767225600, ""])),
    st.tuples(st.sampled_from(["event_id", "user_id", "language"]), st.integers() | st.lists(st.integers())),
    st.tuples(st.just("event_id"), st.just("x" * 129) | st.just("a\x00b") | st.just("\udc80")),
    st.tuples(st.text(min_size=1).filter(lambda k: k not in FIELDS) | HOSTILE_TEXT.filter(bool), ANY_JSON),
    st.tuples(st.sampled_from(["seconds", "language"]), st.integers(40, 500).map(nested)),  # deeper: BODIES
)
FIELDS = {"event_id", "user_id", "started_at", "seconds", "language", "conversation_id", "feature"}


@st.composite
def request_events(draw: st.DrawFn, user: str) -> tuple[list, set[int]]:
    """Events for one request and the indexes certainly bad (the others may still be bad: random JSON)."""
    events, bad = [], set()
    for index in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["good", "good", "bad", "junk"]))
        if kind == "junk":
            events.append(draw(ANY_JSON))
            continue
        event = draw(good_event(user))
        if kind == "bad":
            field, value = draw(CERTAINLY_BAD)
            event[field] = value
            bad.add(index)
        events.append(event)
    return events, bad


def encode(document: object) -> bytes:
    """JSON as a producer in another language might send it: lone surrogates as escapes, integers of any
    length (Python's json refuses to print more than 4300 digits)."""
    return json.dumps(document, default=str).encode()


# -- checking what was stored --------------------------------------------------------------------------------


def query(sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return conn.execute(sql, params).fetchall()


def stored_exactly(event: dict) -> None:
    """The ledger row of a good event says what the event said, to the millisecond."""
    (row,) = query(
        "SELECT user_id::text, started_at, duration_ms, language, conversation_id::text, feature"
        " FROM usage_events WHERE event_id = %s",
        event["event_id"],
    )
    user_id, started_at, duration_ms, language, conversation_id, feature = row
    expected_start = datetime.fromisoformat(event["started_at"].replace("Z", "+00:00"))
    assert (user_id, language, conversation_id, feature) == (
        event["user_id"], event["language"], event.get("conversation_id"), event.get("feature")
    )  # fmt: skip
    assert to_ms(started_at) == to_ms(expected_start)
    assert duration_ms == int(Decimal(repr(event["seconds"])) * 1000)


def letter_reasons() -> dict[str, list[str]]:
    reasons: dict[str, list[str]] = {}
    for ref, reason in query("SELECT ref, reason FROM dead_letters"):
        reasons.setdefault(ref, []).append(reason)
    return reasons


# -- over HTTP -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web() -> Iterator[httpx.Client]:
    with serve_in_thread(web_app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def learner() -> Iterator[str]:
    clear_data()
    with db.transaction() as conn:
        user = str(insert_user(conn))
    yield user
    clear_data()


@fuzzing(60)
@given(data=st.data())
def test_every_event_of_a_request_is_answered_once_and_the_good_ones_stored_exactly(web, learner, data) -> None:
    events, certainly_bad = data.draw(request_events(learner))
    response = web.post("/v1/usage-events", content=encode({"events": events}), headers=AUTH)
    assert response.status_code == 202, response.text
    answer = response.json()
    rejected = {item["index"]: item["reason"] for item in answer["rejected"]}
    assert certainly_bad <= rejected.keys()
    assert all(isinstance(reason, str) and reason for reason in rejected.values())
    answered = len(answer["accepted"]) + len(answer["duplicates"]) + len(rejected)
    assert answered == len(events)
    letters = letter_reasons()
    for index, reason in rejected.items():
        ref = answer["rejected"][[item["index"] for item in answer["rejected"]].index(index)]["event_id"]
        if ref is not None:
            assert reason in letters.get(ref, []), f"no dead letter for event {index}"
    by_id: dict[str, dict] = {}
    for index, event in enumerate(events):
        if index not in rejected:
            by_id.setdefault(event["event_id"], event)  # the first of an id is the one applied
    for event_id in answer["accepted"]:
        stored_exactly(by_id[event_id])


BODIES = st.one_of(
    st.binary(max_size=200),
    ANY_JSON.map(encode),
    st.integers(1, 900).map(lambda depth: encode(nested(depth))),
    st.integers(2000, 6000).map(lambda depth: ("[" * depth + "]" * depth).encode()),
    st.just(b'{"events": []}'),
    st.just(b'{"events": [{}], "extra\\u0000": 1}'),
    st.just(b'{"events": [{"seconds": 1' + b"9" * 6000 + b"}]}"),  # an integer Python will not read
    st.just(b'{"event_id": "\\ud800"}'),
    st.just('{"events": [1], "\ud800": 2}'.encode("utf-8", "surrogatepass")),  # not even UTF-8
)


@fuzzing(80)
@given(body=BODIES)
def test_no_body_of_any_kind_gets_a_5xx(web, body: bytes) -> None:
    response = web.post("/v1/usage-events", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code in (202, 400), response.text
    assert response.json().get("error") or response.status_code == 202


def test_a_10_mb_body_is_a_413_and_changes_nothing(web, learner) -> None:
    body = b'{"events": [' + b",".join([encode({"event_id": "x" * 100})] * 90_000) + b"]}"
    assert len(body) > 10_000_000
    response = web.post("/v1/usage-events", content=body, headers=AUTH)
    assert response.status_code == 413 and "larger than" in response.json()["error"]


# -- through the broker to a real prefork worker ---------------------------------------------------------


@fuzzing(3, shrink=False)
@given(data=st.data())
def test_send_task_messages_of_any_shape_never_kill_the_worker(spawn_worker_once, learner, data) -> None:
    worker = spawn_worker_once
    before = {event_id for (event_id,) in query("SELECT event_id FROM usage_events")}
    batches = data.draw(st.lists(request_events(learner), min_size=2, max_size=5))
    singles = data.draw(st.lists(good_event(learner) | ANY_JSON | st.integers(40, 800).map(nested), max_size=8))
    expected_good = []
    for events, bad in batches:
        app.send_task("metering.record_usage_batch", args=[events])
        expected_good += [event for index, event in enumerate(events) if index not in bad and isinstance(event, dict)]
    for single in singles:
        app.send_task("metering.record_usage", args=[single])
    app.send_task("metering.record_usage_batch", args=[data.draw(ANY_JSON)])
    marker = f"marker-{uuid.uuid4()}"
    good_marker = data.draw(good_event(learner)) | {"event_id": marker}
    app.send_task("metering.record_usage_batch", args=[[good_marker]])  # queued last: all before it were taken
    deadline = time.monotonic() + 60
    while not query("SELECT 1 FROM usage_events WHERE event_id = %s", marker):
        assert time.monotonic() < deadline, "the worker stopped taking messages"
        assert worker.process.poll() is None, "the worker died"
        time.sleep(0.2)
    time.sleep(1)  # the single-event flush of the last moment
    assert worker.process.poll() is None, "the worker died"
    recorded = {event_id for (event_id,) in query("SELECT event_id FROM usage_events")} - before
    for event in expected_good:
        if event.get("event_id") in recorded:
            stored_exactly(event)
    letters = letter_reasons()
    for events, bad in batches:
        for index in bad:
            event_id = events[index].get("event_id") if isinstance(events[index], dict) else None
            if isinstance(event_id, str) and event_id in letters:
                assert all(letters[event_id])  # a reason, never empty
    assert query("SELECT count(*) FROM dead_letters WHERE reason = ''") == [(0,)]


@pytest.fixture(scope="module")
def spawn_worker_once() -> Iterator[object]:
    from support.workers import WorkerProcess

    worker = WorkerProcess(concurrency=2)
    yield worker
    worker.stop()
