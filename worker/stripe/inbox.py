"""The `stripe_events` inbox: each stored event applied exactly once, dead letters replayed, lost
messages swept.

`stripe.process_event` applies an event (`process`) and marks its inbox row processed in one
transaction; the row is locked, so two deliveries of one message never both apply it, and an event that
cannot be applied is dead-lettered with its reason. `sweep` re-queues rows whose message was lost and
gives up on rows that keep failing, so an event Stripe delivered is applied, or lands in `dead_letters`
with a reason, whatever happens to the broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from worker import db, metrics, quota
from worker.dead_letters import MAX_REASON_CHARS, Letter, Rejected, replayer, write
from worker.logs import get_logger
from worker.stripe.handlers import Effect, apply_event, applying
from worker.stripe.webhook import TASK_NAME, enqueue
from worker.tables import stripe_events

log = get_logger(__name__)

REQUEUE_AFTER = timedelta(minutes=5)  # an inbox row this old and not tried this long has lost its message
MAX_ATTEMPTS = 5  # failed tries before the sweep dead-letters an inbox row
SWEEP_BATCH = 1000


@dataclass(frozen=True)
class Processed:
    event_id: str
    outcome: str
    user_id: str | None = None
    already: bool = False  # processed before: this delivery changed nothing


def _invalidate_after_commit(conn: Connection, user_id: str | None) -> None:
    """The user's cached quota answers go once the change commits (their plan or period moved)."""
    if user_id is not None:
        db.after_commit(conn, lambda: quota.invalidate([user_id]))


def _lock_inbox_row(conn: Connection, event_id: str) -> Row | None:
    return conn.execute(sa.select(stripe_events).where(stripe_events.c.id == event_id).with_for_update()).first()


def _mark_processed(conn: Connection, event_id: str, outcome: str, error: str | None, now: datetime) -> None:
    conn.execute(
        sa.update(stripe_events)
        .where(stripe_events.c.id == event_id)
        .values(
            processed_at=now,
            outcome=outcome,
            attempts=stripe_events.c.attempts + 1,
            last_error=error,
            last_attempt_at=now,
        )
    )


def _process_locked(conn: Connection, event_id: str, now: datetime) -> Processed:
    row = _lock_inbox_row(conn, event_id)
    if row is None:
        raise Rejected(f"Stripe event {event_id} is not in stripe_events")
    if row.processed_at is not None:
        return Processed(event_id, row.outcome, already=True)
    error = None
    try:
        with conn.begin_nested():
            effect = apply_event(conn, row.payload, now)
    except Rejected as exc:
        write(conn, [Letter("stripe", row.payload, exc.reason, event_id, TASK_NAME)], now)
        effect, error = Effect("dead_lettered"), exc.reason
    _mark_processed(conn, event_id, effect.outcome, error, now)
    db.after_commit(conn, lambda: metrics.stripe_event(row.type, effect.outcome))
    _invalidate_after_commit(conn, effect.user_id)
    log.info("stripe_event_processed", event_id=event_id, type=row.type, outcome=effect.outcome, note=effect.note)
    return Processed(event_id, effect.outcome, effect.user_id)


def process(conn: Connection, event_id: str, now: datetime) -> Processed:
    """Apply a stored event and mark it processed, in the caller's transaction, which must hold no row
    lock yet: an event that needs Stripe's API fetches with none held (see handlers.applying). Once it
    commits, the user's cached quota goes and the event is counted."""
    return applying(conn, lambda: _process_locked(conn, event_id, now))


def record_failure(conn: Connection, event_id: str, error: str, now: datetime) -> None:
    """Count a try that failed (its transaction rolled back) so the sweep can give up on the event."""
    conn.execute(
        sa.update(stripe_events)
        .where(stripe_events.c.id == event_id, stripe_events.c.processed_at.is_(None))
        .values(attempts=stripe_events.c.attempts + 1, last_error=error[:MAX_REASON_CHARS], last_attempt_at=now)
    )


def process_apart(event_id: str, now: datetime) -> Processed:
    """`process` in a transaction of its own; a failure is counted on the inbox row (best effort) and
    raised."""
    try:
        with db.transaction() as conn:
            processed = process(conn, event_id, now)
    except Rejected:
        raise
    except Exception as exc:
        _count_failed_try(event_id, exc, now)
        raise
    return processed


def _count_failed_try(event_id: str, exc: Exception, now: datetime) -> None:
    """Record the failure on the inbox row (the try's own transaction rolled back). Best effort: when even
    this fails, the task's retry or the sweep still comes back to the row."""
    try:
        with db.transaction() as conn:
            record_failure(conn, event_id, f"{type(exc).__name__}: {exc}", now)
    except Exception as record_exc:
        log.warning("stripe_failure_not_recorded", event_id=event_id, error=str(record_exc))


def _replay_locked(conn: Connection, payload: Any, now: datetime) -> None:
    event_id = payload.get("id") if isinstance(payload, dict) else None
    row = _lock_inbox_row(conn, event_id) if isinstance(event_id, str) else None
    if row is None:
        raise Rejected(f"Stripe event {event_id!r} is not in stripe_events")
    if row.outcome in ("applied", "ignored", "stale"):
        return
    effect = apply_event(conn, row.payload, now)
    _mark_processed(conn, row.id, effect.outcome, None, now)
    _invalidate_after_commit(conn, effect.user_id)


@replayer("stripe")
def replay_event(conn: Connection, payload: Any, now: datetime) -> None:
    """Apply a dead-lettered event again from its inbox row (after the customer was linked, the price
    configured...); an event applied meanwhile is left as it is."""
    return applying(conn, lambda: _replay_locked(conn, payload, now))


# -- the sweep -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    requeue: list[str]  # sent to stripe.process_event once the sweep's transaction has committed
    dead_lettered: list[str]


# Rows whose failure already has a pending dead letter (the task wrote it): closed, not tried again; the
# letter's replay applies them.
_CLOSE_LETTERED = sa.text(
    """
    UPDATE stripe_events SET processed_at = :now, outcome = 'dead_lettered'
    WHERE id IN (
        SELECT e.id FROM stripe_events e
        WHERE e.processed_at IS NULL AND e.received_at <= :cutoff
          AND (e.last_attempt_at IS NULL OR e.last_attempt_at <= :cutoff)
          AND EXISTS (SELECT 1 FROM dead_letters d
                      WHERE d.source = 'stripe' AND d.ref = e.id AND d.replayed_at IS NULL)
        ORDER BY e.id LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)

_EXHAUSTED = sa.text(
    """
    SELECT id, payload, attempts, last_error FROM stripe_events
    WHERE processed_at IS NULL AND attempts >= :max_attempts
      AND (last_attempt_at IS NULL OR last_attempt_at <= :cutoff)
    ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED
    """
)

# last_attempt_at is also set when a row is re-queued, so it is re-queued once per REQUEUE_AFTER, not at
# every sweep while its message waits behind others.
_REQUEUE = sa.text(
    """
    UPDATE stripe_events SET last_attempt_at = :now
    WHERE id IN (
        SELECT id FROM stripe_events
        WHERE processed_at IS NULL AND received_at <= :cutoff
          AND (last_attempt_at IS NULL OR last_attempt_at <= :cutoff)
        ORDER BY received_at LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)


def sweep(conn: Connection, now: datetime) -> SweepResult:
    """Find inbox rows left unprocessed REQUEUE_AFTER after receipt and not tried since: re-queue them, or,
    after MAX_ATTEMPTS failed tries, dead-letter them with their last error. Rows locked by a run in
    progress are skipped, so two sweeps at once never handle one row twice."""
    params = {"now": now, "cutoff": now - REQUEUE_AFTER, "batch": SWEEP_BATCH}
    closed = list(conn.scalars(_CLOSE_LETTERED, params))
    exhausted = conn.execute(_EXHAUSTED, {**params, "max_attempts": MAX_ATTEMPTS}).all()
    write(
        conn,
        [
            Letter(
                "stripe",
                row.payload,
                f"gave up after {row.attempts} attempts: {row.last_error or 'no error recorded'}",
                row.id,
                TASK_NAME,
            )
            for row in exhausted
        ],
        now,
    )
    given_up = [row.id for row in exhausted]
    if given_up:
        conn.execute(
            sa.update(stripe_events)
            .where(stripe_events.c.id.in_(given_up))
            .values(processed_at=now, outcome="dead_lettered")
        )
    requeue = list(conn.scalars(_REQUEUE, params))
    if requeue:
        db.after_commit(conn, lambda: enqueue(requeue))
    if requeue or closed or given_up:
        log.info("stripe_sweep", requeued=len(requeue), dead_lettered=len(closed) + len(given_up))
    return SweepResult(requeue=requeue, dead_lettered=closed + given_up)
