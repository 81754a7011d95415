"""The one retry decision (worker.retry): what is retried, how long it waits, and in-place retries."""

from __future__ import annotations

import psycopg
import pytest

from worker import retry


def test_only_transient_failures_are_retried_with_growing_capped_delays() -> None:
    deadlock = psycopg.errors.DeadlockDetected("deadlock")
    delays = [retry.retry_delay(deadlock, attempts) for attempts in range(12)]
    assert all(delay is not None for delay in delays[: retry.MAX_RETRIES])
    assert delays[retry.MAX_RETRIES] is None  # given up
    assert 0.25 <= delays[0] <= 0.5 and all(delay <= retry.MAX_BACKOFF for delay in delays[:10])
    assert retry.retry_delay(deadlock, 50, max_retries=None) is not None  # a dead letter that cannot be written
    assert retry.retry_delay(ValueError("a bug"), 0) is None


def test_the_reason_says_how_many_tries_were_made() -> None:
    assert retry.failure_reason(psycopg.errors.DeadlockDetected("deadlock"), 2) == (
        "gave up after 3 attempts: DeadlockDetected: deadlock"
    )
    assert retry.failure_reason(ValueError("bad"), 0) == "ValueError: bad"


def test_in_place_retries_transient_failures_then_raises_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry.time, "sleep", lambda _seconds: None)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise psycopg.errors.SerializationFailure("again")
        return "done"

    assert retry.in_place(flaky, attempts=3, what="test") == "done"
    calls.clear()
    with pytest.raises(psycopg.errors.SerializationFailure):
        retry.in_place(flaky, attempts=2, what="test")
    assert len(calls) == 2
    with pytest.raises(ValueError):
        retry.in_place(lambda: (_ for _ in ()).throw(ValueError("not transient")), attempts=5, what="test")
