"""The one retry decision: which failures are worth another try, and after how long.

Only transient database errors are retried (deadlocks, serialization failures, lock and idle timeouts,
lost connections, a period that moved under a batch); anything else would fail the same way again. Tasks
retry through Celery (`WorkerTask.retry_or_raise`); the coalesced usage flush and the HTTP ingest retry
in place (`in_place`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from worker import db
from worker.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

MAX_RETRIES = 10
MAX_BACKOFF = 60.0  # seconds


def retry_delay(exc: BaseException, attempts: int, max_retries: int | None = MAX_RETRIES) -> float | None:
    """Seconds to wait before trying again after `attempts` failed tries, or None to give up. The delay is
    exponential with full jitter, capped at MAX_BACKOFF."""
    if not db.is_transient(exc) or (max_retries is not None and attempts >= max_retries):
        return None
    return random.uniform(0.5, 1.0) * min(MAX_BACKOFF, 0.5 * 2.0**attempts)


def failure_reason(exc: BaseException, attempts: int) -> str:
    """The reason recorded for work that failed for good after `attempts` earlier failed tries."""
    prefix = f"gave up after {attempts + 1} attempts: " if db.is_transient(exc) else ""
    return f"{prefix}{type(exc).__name__}: {exc}"


def in_place(work: Callable[[], T], attempts: int, what: str) -> T:
    """`work()`, tried up to `attempts` times while it fails transiently; the last failure is raised."""
    for attempt in range(attempts):
        try:
            return work()
        except Exception as exc:
            delay = retry_delay(exc, attempt, max_retries=attempts - 1)
            if delay is None:
                raise
            log.warning("retry_in_place", what=what, attempt=attempt + 1, error=str(exc).splitlines()[0])
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt raises")
