"""The answers metering publishes to Redis: written by hand, read as JSON, compared by their version."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from support.run import flush_redis

from worker import quota

USER = "0d8b7f6c-4f7e-4f43-9a39-8a0c8f0e1e21"
JAN = datetime(2027, 1, 1, tzinfo=UTC)
FEB = datetime(2027, 2, 1, tzinfo=UTC)
NOW = datetime(2027, 1, 15, tzinfo=UTC)


@pytest.fixture(autouse=True)
def empty_redis() -> None:
    flush_redis()


def answer(used_ms: int, generation: int = 0, limit_ms: int = 3_600_000) -> quota.Quota:
    return quota.Quota.from_ms(USER, "free", limit_ms, used_ms, JAN, FEB, generation)


def versioned(q: quota.Quota) -> dict:
    """What the answer used to be stored as: json.dumps of its fields and its version."""
    version = {
        "v_generation": q.generation,
        "v_start": int(JAN.timestamp() * 1000),
        "v_used": round(q.used_seconds * 1000),
    }
    return {**{name: getattr(q, name) for name in quota.USAGE_FIELDS}, **version}  # the cache holds usage only


@pytest.mark.parametrize("used_ms", [0, 1, 999, 1_234_567, 3_600_000, 3_600_001, 10**12])
def test_a_stored_answer_reads_back_as_its_fields_and_version(used_ms: int) -> None:
    q = answer(used_ms, generation=4)
    assert json.loads(quota.stored_answer(q)) == versioned(q)


def test_text_that_needs_escapes_is_written_by_json_and_still_begins_with_the_version() -> None:
    q = replace(answer(5), plan='odd "plan" \\ \n')
    stored = quota.stored_answer(q)
    assert json.loads(stored) == versioned(q)
    assert stored.startswith('{"v_generation": 0, "v_start": ')


def test_answers_stored_by_an_older_worker_are_compared_by_their_version(redis_client) -> None:
    newer, older = answer(20_000), answer(10_000)
    redis_client.set(quota.KEY_PREFIX + USER, json.dumps(versioned(newer)))  # the older layout: fields first
    quota.publish([older])
    assert quota.cached(USER, NOW).used_seconds == 20
    redis_client.set(quota.KEY_PREFIX + USER, json.dumps(versioned(older)))
    quota.publish([newer])
    assert quota.cached(USER, NOW) == newer


def test_an_answer_of_an_older_generation_never_replaces_a_newer_one(redis_client) -> None:
    quota.publish([answer(50_000, generation=2)])
    quota.publish([answer(60_000, generation=1)])
    assert quota.cached(USER, NOW) == answer(50_000, generation=2)
    redis_client.set(quota.GENERATION_PREFIX + USER, 3)
    quota.publish([answer(70_000, generation=2)])  # read before the change that bumped the generation
    assert quota.cached(USER, NOW) == answer(50_000, generation=2)
