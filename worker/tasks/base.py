"""The one place where task failures are sorted into retry, dead letter or success.

- Rejected (bad input): dead-lettered with its reason; the message is acknowledged.
- A transient database error (deadlock, serialization failure, lost connection): retried with
  exponential backoff; after max_retries the input is dead-lettered rather than dropped.
- Any other exception is a bug or an unforeseen input: dead-lettered with the exception as reason.
- If even the dead letter cannot be written (PostgreSQL down), the task is retried without limit:
  the message is never acknowledged without its effect or its letter being committed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import celery

from worker import db
from worker.dead_letters import Letter, Rejected, record
from worker.logs import get_logger

log = get_logger(__name__)

MAX_BACKOFF = 60.0  # seconds
# On RabbitMQ's quorum queues a countdown waits in Celery's native delayed delivery, which counts whole
# seconds and fails on a countdown under one (celery 5.6: Task.retry then rejects the message unqueued).
MIN_RETRY_COUNTDOWN = 1.0  # seconds


def utcnow() -> datetime:
    return datetime.now(UTC)


def backoff(retries: int) -> float:
    """Seconds before retry number `retries + 1`: exponential with full jitter, capped."""
    return random.uniform(0.5, 1.0) * min(MAX_BACKOFF, 0.5 * 2**retries)


def retry_countdown(retries: int) -> float:
    """Seconds before a task's retry number `retries + 1`: the backoff, never under a second."""
    return max(MIN_RETRY_COUNTDOWN, backoff(retries))


def parse_now(value: str | None) -> datetime:
    """A task's optional ISO-8601 `now` argument; the current time when absent."""
    if value is None:
        return utcnow()
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"now={value!r} has no UTC offset")
    return parsed


def write_letters(letters: list[Letter]) -> None:
    """Store dead letters in a transaction of their own."""
    with db.transaction() as conn:
        record(conn, letters, utcnow())


class WorkerTask(celery.Task):
    acks_late = True
    max_retries = 10

    @contextmanager
    def dead_lettering(self, letters: Callable[[str], list[Letter]]) -> Iterator[None]:
        """Run the block; on failure retry or dead-letter `letters(reason)` as the docstring above says."""
        try:
            yield
        except Rejected as exc:
            self._dead_letter(letters(exc.reason))
        except Exception as exc:
            retries = self.request.retries or 0
            if db.is_transient(exc) and retries < self.max_retries:
                log.warning("task_retry", task=self.name, task_id=self.request.id, retries=retries, error=str(exc))
                raise self.retry(exc=exc, countdown=retry_countdown(retries)) from exc
            prefix = f"gave up after {retries + 1} attempts: " if db.is_transient(exc) else ""
            log.exception("task_failed", task=self.name, task_id=self.request.id)
            self._dead_letter(letters(f"{prefix}{type(exc).__name__}: {exc}"))

    def _dead_letter(self, letters: list[Letter]) -> None:
        try:
            write_letters(letters)
        except Exception as exc:
            log.exception("dead_letter_write_failed", task=self.name, task_id=self.request.id)
            retries = self.request.retries or 0
            raise self.retry(exc=exc, countdown=retry_countdown(retries), max_retries=None) from exc
