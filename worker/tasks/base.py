"""The one place where task failures are sorted into retry, dead letter or success.

- Rejected (bad input): dead-lettered with its reason; the message is acknowledged.
- A transient database error (deadlock, serialization failure, lock or idle timeout, lost connection):
  retried with exponential backoff; after MAX_RETRIES the input is dead-lettered rather than dropped.
- Any other exception is a bug or an unforeseen input: dead-lettered with the exception as reason.
- If even the dead letter cannot be written (PostgreSQL down), the task is retried without limit:
  the message is never acknowledged without its effect or its letter being committed.

The retry decision itself is worker.retry's, shared with the in-place retries of the coalesced usage
flush and the HTTP ingest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import celery

from worker import db
from worker.clock import utcnow
from worker.dead_letters import Letter, Rejected, write
from worker.logs import get_logger
from worker.retry import MAX_RETRIES, failure_reason, retry_delay

log = get_logger(__name__)

T = TypeVar("T")

# On RabbitMQ's quorum queues a countdown waits in Celery's native delayed delivery, which counts whole
# seconds and fails on a countdown under one (celery 5.6: Task.retry then rejects the message unqueued).
MIN_RETRY_COUNTDOWN = 1.0  # seconds


def write_letters(letters: list[Letter]) -> None:
    """Store dead letters in a transaction of their own."""
    with db.transaction() as conn:
        write(conn, letters, utcnow())


class WorkerTask(celery.Task):
    acks_late = True
    max_retries = MAX_RETRIES

    def retry_or_raise(self, exc: Exception) -> None:
        """Retry the task when `retry_delay` says so (raising celery's Retry); else return."""
        retries = self.request.retries or 0
        delay = retry_delay(exc, retries, self.max_retries)
        if delay is not None:
            log.warning("task_retry", task=self.name, task_id=self.request.id, retries=retries, error=str(exc))
            raise self.retry(exc=exc, countdown=max(MIN_RETRY_COUNTDOWN, delay)) from exc

    def retrying(self, job: Callable[[], T]) -> T:
        """Run a job whose input is itself (a periodic job, a reconciliation): a transient failure is retried
        with backoff, anything else raised (the job records it; the next scheduled run starts afresh)."""
        try:
            return job()
        except Exception as exc:
            self.retry_or_raise(exc)
            raise

    @contextmanager
    def dead_lettering(self, letters: Callable[[str], list[Letter]]) -> Iterator[None]:
        """Run the block; on failure retry or dead-letter `letters(reason)` as the docstring above says."""
        try:
            yield
        except Rejected as exc:
            self._dead_letter(letters(exc.reason))
        except Exception as exc:
            self.retry_or_raise(exc)
            log.exception("task_failed", task=self.name, task_id=self.request.id)
            self._dead_letter(letters(failure_reason(exc, self.request.retries or 0)))

    def _dead_letter(self, letters: list[Letter]) -> None:
        try:
            write_letters(letters)
        except Exception as exc:
            log.exception("dead_letter_write_failed", task=self.name, task_id=self.request.id)
            delay = retry_delay(exc, self.request.retries or 0, max_retries=None) or 1.0
            raise self.retry(exc=exc, countdown=max(MIN_RETRY_COUNTDOWN, delay), max_retries=None) from exc
