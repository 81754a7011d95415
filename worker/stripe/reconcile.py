"""Reconciliation with Stripe: `stripe.reconcile` (daily, from beat) and `python -m worker stripe-reconcile
[--since] [--dry-run]`, for what missed webhooks left behind.

Stripe retries a webhook for three days. An endpoint that was down longer, pointed at the wrong URL or
held a wrong secret leaves subscriptions wrong for good (a learner who paid stays on the free plan, one
who cancelled keeps premium). A run, with STRIPE_API_KEY set:

1. Events. It pages through Stripe's event log (GET /v1/events: the handled types, created at or after
   `since`, by default 30 days back, as long as Stripe keeps events; 100 a page, newest first, each page
   `starting_after` the last event of the one before), stores every event the inbox lacks with the
   webhook's own `store`, then processes the inbox rows of that window still unprocessed, oldest first,
   with `inbox.process`: the webhook's path, so order safety and exactly-once hold.
2. Subscriptions. It compares every linked subscription that has not ended with GET /v1/subscriptions/{id}
   and repairs what still differs (status, plan, period, cancellation, trial; a subscription linked but
   never described) through the path of subscription events, its audit_logs rows naming the run
   (`reconcile:<run id>`). The repair carries Stripe's time of the answer (its Date header), so an event
   created after it still wins and one created before it is stale.

Progress is written to `stripe_reconcile_runs` after every page and every subscription, so a run that
stops half-way (Stripe down beyond the retries, the process killed) is resumed by the next one from where
it stopped. One run at a time: a session advisory lock (no transaction is held across Stripe's API); a
second run skips. A dry run lists what differs and writes nothing. The counter
worldspeak_stripe_drift_total{kind} and the log line `stripe_reconcile_done` say how much drift each run
found; the run is recorded in maintenance_runs as `stripe_reconcile`.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Row

from worker import db, metrics, quota
from worker.config import settings
from worker.dead_letters import Rejected
from worker.logs import get_logger
from worker.maintenance.runner import MAX_ERROR_CHARS, recorded_run
from worker.stripe import api, handlers, inbox, webhook
from worker.stripe.payloads import ENDED, SubscriptionState, read_subscription, subscription_object, to_datetime
from worker.tables import stripe_events, stripe_reconcile_runs, stripe_subscriptions

log = get_logger(__name__)

JOB = "stripe_reconcile"  # maintenance_runs.job and SCHEDULE_STRIPE_RECONCILE_SECONDS
TASK_NAME = "stripe.reconcile"
EVENT_WINDOW = timedelta(days=30)  # how long Stripe keeps events
PAGE_SIZE = 100  # events a page, Stripe's most
SUBSCRIPTION_BATCH = 100  # linked subscriptions read per query
HANDLED_TYPES = tuple(handlers.HANDLERS)
LOCK_KEY = "worldspeak:stripe_reconcile"


class ReconcileUnavailable(RuntimeError):
    """Reconciliation needs Stripe's API: STRIPE_API_KEY is not set."""


@dataclass(frozen=True)
class Difference:
    kind: str  # missing_event, missing_state, status, plan, period, cancellation, trial, unreadable, not_found, refused
    subject: str  # the event or subscription it is about
    detail: str


@dataclass
class Report:
    run_id: str | None
    since: datetime
    dry_run: bool = False
    ran: bool = True  # False: another run held the lock
    resumed: bool = False
    pages: int = 0
    events_listed: int = 0
    events_processed: Counter[str] = field(default_factory=Counter)  # outcome -> count
    subscriptions_checked: int = 0
    repaired: int = 0
    differences: list[Difference] = field(default_factory=list)

    def drift(self) -> dict[str, int]:
        return dict(sorted(Counter(difference.kind for difference in self.differences).items()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": JOB,
            "ran": self.ran,
            "run_id": self.run_id,
            "since": self.since.isoformat(),
            "dry_run": self.dry_run,
            "resumed": self.resumed,
            "pages": self.pages,
            "events_listed": self.events_listed,
            "events_processed": dict(self.events_processed),
            "subscriptions_checked": self.subscriptions_checked,
            "repaired": self.repaired,
            "drift": self.drift(),
        }


def run(since: datetime | None, now: datetime, dry_run: bool = False) -> Report:
    """Reconcile events created from `since` (default: EVENT_WINDOW before `now`) and every linked
    subscription; with `dry_run`, only find what differs."""
    if not settings().stripe_api_key:
        raise ReconcileUnavailable("stripe reconciliation needs STRIPE_API_KEY (Stripe's API)")
    if dry_run:
        return _dry_run(since or _window_start(now), now)
    with _exclusive() as held:
        if not held:
            log.info("stripe_reconcile_skipped", reason="another run holds its lock")
            return Report(None, since or _window_start(now), ran=False)
        with recorded_run(JOB):
            report = _run(since, now)
    log.info("stripe_reconcile_done", **report.as_dict())
    return report


def _window_start(now: datetime) -> datetime:
    """The oldest events Stripe still lists."""
    return (now - EVENT_WINDOW).replace(microsecond=0)


_TRY_LOCK = sa.text("SELECT pg_try_advisory_lock(hashtext(:key))")
_UNLOCK = sa.text("SELECT pg_advisory_unlock(hashtext(:key))")


@contextmanager
def _exclusive() -> Iterator[bool]:
    """Whether this process holds the reconciliation's lock for the block: a session lock on a connection
    of its own in autocommit, so no transaction stays open while Stripe is asked (a dead process's lock
    goes with its connection)."""
    with db.engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        held = bool(conn.execute(_TRY_LOCK, {"key": LOCK_KEY}).scalar())
        try:
            yield held
        finally:
            if held:
                conn.execute(_UNLOCK, {"key": LOCK_KEY})


# -- runs ---------------------------------------------------------------------------------------------------

_UNFINISHED = sa.select(stripe_reconcile_runs).where(stripe_reconcile_runs.c.finished_at.is_(None))


def _start(conn: Connection, since: datetime | None, now: datetime) -> tuple[Row, bool]:
    """The unfinished run asked for the same `since` within Stripe's event window (resumed), else a new
    run; other unfinished runs are closed as superseded."""
    unfinished = conn.execute(_UNFINISHED.order_by(stripe_reconcile_runs.c.started_at.desc()).with_for_update()).all()
    resumable = [row for row in unfinished if row.since_requested == since and row.started_at > now - EVENT_WINDOW]
    resumed = resumable[0] if resumable else None
    superseded = [row.id for row in unfinished if resumed is None or row.id != resumed.id]
    if superseded:
        conn.execute(
            sa.update(stripe_reconcile_runs)
            .where(stripe_reconcile_runs.c.id.in_(superseded))
            .values(finished_at=now, phase="superseded")
        )
    if resumed is not None:
        return resumed, True
    run_id = f"rec_{now:%Y%m%dT%H%M%SZ}_{uuid.uuid4().hex[:8]}"
    row = conn.execute(
        pg_insert(stripe_reconcile_runs)
        .values(id=run_id, since_requested=since, since=since or _window_start(now), started_at=now, phase="events")
        .returning(stripe_reconcile_runs)
    ).one()
    return row, False


def _progress(conn: Connection, run_id: str, drift: list[Difference], **values: Any) -> None:
    """Move the run's cursors and counters on, adding what it found (counted in the metric once this
    commits, so a run resumed after a stop counts each difference once)."""
    found = Counter(difference.kind for difference in drift)
    conn.execute(
        sa.update(stripe_reconcile_runs)
        .where(stripe_reconcile_runs.c.id == run_id)
        .values(
            drift=sa.func.jsonb_sum_merge(stripe_reconcile_runs.c.drift, sa.bindparam("found", dict(found), JSONB)),
            **values,
        )
    )
    for kind, count in found.items():
        db.after_commit(conn, functools.partial(metrics.stripe_drift, kind, count))


def _run(since: datetime | None, now: datetime) -> Report:
    with db.transaction() as conn:
        row, resumed = _start(conn, since, now)
    report = Report(row.id, row.since, resumed=resumed)
    try:
        if row.phase == "events":
            _take_events(row, report, now)
        _compare_subscriptions(row, report, now)
    except Exception as exc:
        with db.transaction() as conn:
            _progress(conn, row.id, [], last_error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        raise
    with db.transaction() as conn:
        _progress(conn, row.id, [], phase="done", finished_at=now, last_error=None)
    return report


# -- 1. events ----------------------------------------------------------------------------------------------


def _missing(conn: Connection, events: list[dict]) -> list[dict]:
    """The listed events of handled types that the inbox lacks, each checked as the webhook checks one."""
    ids = [event.get("id") for event in events]
    known = set(conn.scalars(sa.select(stripe_events.c.id).where(stripe_events.c.id.in_([i for i in ids if i]))))
    missing = []
    for event in events:
        if event.get("id") in known or event.get("type") not in HANDLED_TYPES:
            continue
        try:
            missing.append(webhook.check_event(event))
        except webhook.InvalidWebhook as exc:
            log.warning("stripe_reconcile_bad_event", event_id=event.get("id"), reason=exc.reason)
    return missing


def _pages(since: datetime, cursor: str | None) -> Iterator[api.EventPage]:
    created_gte = int(since.timestamp())
    while True:
        page = api.list_events(HANDLED_TYPES, created_gte, cursor, PAGE_SIZE)
        yield page
        if not page.has_more or not page.events:
            return
        cursor = page.events[-1]["id"]


def _event_difference(event: dict) -> Difference:
    created = to_datetime(event["created"]).isoformat()
    return Difference("missing_event", event["id"], f"{event['type']} of {created} never reached the inbox")


def _take_events(row: Row, report: Report, now: datetime) -> None:
    """Every handled event Stripe lists that the inbox lacks, stored page by page (with the run's cursor),
    then every unprocessed inbox row of the window processed, oldest first."""
    for page in _pages(row.since, row.event_cursor):
        with db.transaction() as conn:
            missing = _missing(conn, page.events)
            for event in missing:
                webhook.store(conn, event, now)
            found = [_event_difference(event) for event in missing]
            cursor = page.events[-1]["id"] if page.events else row.event_cursor
            _progress(
                conn,
                row.id,
                found,
                event_cursor=cursor,
                pages=stripe_reconcile_runs.c.pages + 1,
                events_listed=stripe_reconcile_runs.c.events_listed + len(page.events),
            )
        report.pages += 1
        report.events_listed += len(page.events)
        report.differences += found
    for event_id in _unprocessed(row.since):
        try:
            processed = inbox.process_apart(event_id, now)
        except Exception as exc:  # counted on its inbox row; the sweep tries it again
            log.warning("stripe_reconcile_event_failed", event_id=event_id, error=f"{type(exc).__name__}: {exc}")
            report.events_processed["failed"] += 1
            continue
        report.events_processed[processed.outcome] += 1
    with db.transaction() as conn:
        _progress(conn, row.id, [], phase="subscriptions")


def _unprocessed(since: datetime) -> list[str]:
    with db.engine().connect() as conn:
        query = (
            sa.select(stripe_events.c.id)
            .where(stripe_events.c.processed_at.is_(None), stripe_events.c.created >= since)
            .order_by(stripe_events.c.created, stripe_events.c.id)
        )
        return list(conn.scalars(query))


# -- 2. subscriptions ---------------------------------------------------------------------------------------

_LINKED = sa.text(
    """
    SELECT id FROM (
        SELECT id FROM stripe_subscriptions WHERE status IS NULL OR status <> ALL(CAST(:ended AS text[]))
        UNION
        SELECT stripe_subscription_id FROM subscriptions
        WHERE stripe_subscription_id IS NOT NULL
          AND (stripe_status IS NULL OR stripe_status <> ALL(CAST(:ended AS text[])))
    ) AS linked
    WHERE CAST(:after AS text) IS NULL OR id > :after
    ORDER BY id
    LIMIT :batch
    """
)


def _linked(after: str | None) -> Iterator[str]:
    """Every linked subscription that has not ended, in id order, after `after`."""
    while True:
        with db.engine().connect() as conn:
            batch = list(conn.scalars(_LINKED, {"ended": sorted(ENDED), "after": after, "batch": SUBSCRIPTION_BATCH}))
        yield from batch
        if len(batch) < SUBSCRIPTION_BATCH:
            return
        after = batch[-1]


def _stored(subscription_id: str) -> Row | None:
    with db.engine().connect() as conn:
        return conn.execute(sa.select(stripe_subscriptions).where(stripe_subscriptions.c.id == subscription_id)).first()


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(_shown(part) for part in value)
    if isinstance(value, datetime):
        return value.isoformat()
    return "-" if value is None else str(value)


def differences(stored: Row | None, current: SubscriptionState) -> list[Difference]:
    """What the worker holds about a subscription that differs from what Stripe says now."""
    if stored is None or stored.status is None:
        return [Difference("missing_state", current.id, f"no state recorded; Stripe says {current.status}")]
    found = []

    def differ(kind: str, ours: Any, stripes: Any) -> None:
        if ours != stripes:
            found.append(Difference(kind, current.id, f"{_shown(ours)} -> {_shown(stripes)}"))

    differ("status", stored.status, current.status)
    if current.plan is not None and current.period is not None:
        plan = current.plan
        differ(
            "plan",
            (stored.plan_type, stored.monthly_minutes_limit, stored.price_id),
            (plan.plan, plan.monthly_minutes, plan.price_id),
        )
        differ("period", (stored.current_period_start, stored.current_period_end), current.period)
    differ(
        "cancellation",
        (stored.cancel_at_period_end, stored.canceled_at),
        (current.cancel_at_period_end, current.canceled_at),
    )
    differ("trial", stored.trial_end, current.trial_end)
    return found


def _compare(subscription_id: str) -> tuple[api.Answer | None, list[Difference]]:
    """Stripe's answer about a linked subscription and what differs from it (nothing to repair without
    an answer the worker can read)."""
    try:
        answer = api.retrieve_subscription(subscription_id)
        if answer.payload.get("status") == "incomplete":
            return None, []  # nothing is applied until its payment settles
        current = read_subscription(subscription_object(answer.payload, f"Stripe API answer for {subscription_id}"))
    except api.Refused as exc:
        return None, [Difference("not_found" if exc.http_status == 404 else "refused", subscription_id, exc.reason)]
    except Rejected as exc:  # an answer the worker cannot read (an unknown price...): nothing to repair it with
        return None, [Difference("unreadable", subscription_id, exc.reason)]
    return answer, differences(_stored(subscription_id), current)


def _repair(run_id: str, answer: api.Answer, now: datetime) -> handlers.Effect:
    """Stripe's current state applied as a subscription event of the time Stripe answered."""
    subscription_id = answer.payload["id"]
    cause = handlers.Cause(f"reconcile:{run_id}", (answer.as_of or now).replace(microsecond=0), f"reconcile:{run_id}")
    fetched = handlers.Fetched({subscription_id: answer})
    with db.transaction() as conn:
        effect = handlers.applying(
            conn, lambda: handlers.apply_current_state(conn, cause, answer.payload, now), fetched
        )
        if effect.user_id is not None:
            db.after_commit(conn, functools.partial(quota.invalidate, [effect.user_id]))
    log.info("stripe_reconcile_repaired", run_id=run_id, subscription=subscription_id, outcome=effect.outcome)
    return effect


def _compare_subscriptions(row: Row, report: Report, now: datetime) -> None:
    for subscription_id in _linked(row.subscription_cursor):
        answer, found = _compare(subscription_id)
        if answer is not None and found and _repair(row.id, answer, now).outcome != "stale":
            report.repaired += 1
        report.subscriptions_checked += 1
        report.differences += found
        with db.transaction() as conn:
            _progress(
                conn,
                row.id,
                found,
                subscription_cursor=subscription_id,
                subscriptions_checked=stripe_reconcile_runs.c.subscriptions_checked + 1,
            )


# -- a dry run ----------------------------------------------------------------------------------------------


def _dry_run(since: datetime, now: datetime) -> Report:
    report = Report(None, since, dry_run=True)
    for page in _pages(since, None):
        with db.engine().connect() as conn:
            report.differences += [_event_difference(event) for event in _missing(conn, page.events)]
        report.pages += 1
        report.events_listed += len(page.events)
    for subscription_id in _linked(None):
        report.differences += _compare(subscription_id)[1]
        report.subscriptions_checked += 1
    log.info("stripe_reconcile_done", **report.as_dict())
    return report
