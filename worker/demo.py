"""`python -m worker demo`: three learners, a live stream of their microphone usage, and where each stands.

It runs against the running system. The learners are written to PostgreSQL as sign-up and Stripe would
have left them (one per plan; the paid two linked to a Stripe customer and subscription). Their usage
goes through the public path: `POST /v1/usage-events` on the web (--url, with a token of
INGEST_API_TOKENS), or, when no token is configured or the web does not answer, to the broker as an app
server sends it (`metering.record_usage_batch`). Once the worker has committed everything, the free learner,
three minutes short of the 60-minute limit, has a live conversation (worker.sessions, as an app server that
imports the package runs one) that is cut when the limit is reached; then a table shows each learner's
minutes, remaining quota and alerts.

Reruns are safe: the demo learners (demo-<plan>@worldspeak.example) are deleted and created again.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, periods, quota, sessions
from worker.celery import app
from worker.clock import utcnow
from worker.config import settings

BATCH_TASK = "metering.record_usage_batch"

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_EVENTS = 1000
EVENTS_PER_REQUEST = 50
HTTP_TIMEOUT = 10.0  # seconds per request
PAID_PERIOD_AGE = timedelta(days=3)  # how far into their Stripe period the paid learners are
HISTORY = timedelta(days=3)  # usage is spread over at most this much of the current period
REPORT_EVERY = 20  # seconds of the live conversation between its app's reports


@dataclass(frozen=True)
class Persona:
    plan: str
    name: str
    timezone: str
    languages: tuple[str, ...]
    percent_of_limit: int  # how much of the plan's minutes the demo uses

    @property
    def email(self) -> str:
        return f"demo-{self.plan}@worldspeak.example"


PERSONAS = (
    Persona("free", "Aiko (demo)", "Asia/Tokyo", ("en",), 95),
    Persona("standard", "Lukas (demo)", "Europe/Berlin", ("zh", "en"), 50),
    Persona("premium", "Marina (demo)", "America/Sao_Paulo", ("ja", "en", "pt-BR"), 10),
)


@dataclass(frozen=True)
class Learner:
    persona: Persona
    user_id: str
    period_start: datetime


class DemoError(Exception):
    """The demo cannot go on; the message says what to start or configure."""


# -- learners ----------------------------------------------------------------------------------------------

# The learner's row and the state of the Stripe subscription it shows, as Stripe's events would leave them.
_INSERT_PAID_SUBSCRIPTION = sa.text(
    """
    WITH paid AS (
        INSERT INTO subscriptions (user_id, plan_type, status, current_period_start, current_period_end, reset_date,
                                   monthly_minutes_limit, monthly_minutes_used, stripe_customer_id,
                                   stripe_subscription_id, stripe_price_id, stripe_status, stripe_state_at)
        SELECT :user_id, :plan, 'active', :start, b.period_end, (b.period_end AT TIME ZONE 'UTC')::date, :minutes, 0,
               :customer, :subscription, :price, 'active', :start
        FROM (SELECT next_period_end(:start, 'UTC', false) AS period_end) AS b
        RETURNING *
    )
    INSERT INTO stripe_subscriptions (id, user_id, customer_id, status, plan_type, monthly_minutes_limit, price_id,
                                      current_period_start, current_period_end, created, state_at, linked_at,
                                      updated_at)
    SELECT stripe_subscription_id, user_id, stripe_customer_id, stripe_status, plan_type, monthly_minutes_limit,
           stripe_price_id, current_period_start, current_period_end, :start, :start, :start, :start
    FROM paid
    """
)


def _price_of(plan: str) -> str:
    prices = [price for price, mapped in settings().stripe_price_plans.items() if mapped == plan]
    return prices[0] if prices else f"price_demo_{plan}"


def create_learners(conn: Connection, now: datetime) -> list[Learner]:
    """The demo learners, created afresh (a rerun deletes the previous ones and all their usage)."""
    emails = [persona.email for persona in PERSONAS]
    conn.execute(sa.text("DELETE FROM auth.users WHERE email = ANY(:emails)"), {"emails": emails})
    user_ids = {persona.plan: str(uuid.uuid4()) for persona in PERSONAS}
    for persona in PERSONAS:
        user_id = user_ids[persona.plan]
        conn.execute(
            sa.text(
                "INSERT INTO auth.users (id, email, raw_app_meta_data, raw_user_meta_data)"
                " VALUES (:id, :email, '{}', '{\"demo\": true}')"
            ),
            {"id": user_id, "email": persona.email},
        )
        conn.execute(
            sa.text(
                "INSERT INTO profiles (id, email, full_name, native_language, target_languages, timezone)"
                " VALUES (:id, :email, :name, 'ja', :languages, :timezone)"
            ),
            {"id": user_id, "email": persona.email, "name": persona.name, "languages": list(persona.languages),
             "timezone": persona.timezone},
        )  # fmt: skip
        if persona.plan != "free":
            conn.execute(
                _INSERT_PAID_SUBSCRIPTION,
                {"user_id": user_id, "plan": persona.plan, "start": now - PAID_PERIOD_AGE,
                 "minutes": settings().minutes_for_plan(persona.plan), "customer": f"cus_demo_{persona.plan}",
                 "subscription": f"sub_demo_{persona.plan}", "price": _price_of(persona.plan)},
            )  # fmt: skip
    # The free learner's subscription and everyone's current period, as metering would create them.
    periods.ensure_periods(conn, {user_id: periods.Span(now, now) for user_id in user_ids.values()}, now)
    starts: dict[str, datetime] = dict(
        conn.execute(
            sa.text("SELECT user_id::text, current_period_start FROM subscriptions WHERE user_id = ANY(:ids)"),
            {"ids": list(user_ids.values())},
        ).all()
    )
    return [Learner(persona, user_ids[persona.plan], starts[user_ids[persona.plan]]) for persona in PERSONAS]


# -- usage -------------------------------------------------------------------------------------------------


def make_events(learners: list[Learner], count: int, now: datetime, rng: random.Random) -> list[dict]:
    """About `count` events in all, each learner's summing exactly to their share of their limit.

    Sessions of a few to fifteen utterances in one language share a conversation; every event lies in the
    learner's current period, in its last days; the streams of the learners are interleaved.
    """
    targets = {learner.user_id: _target_ms(learner.persona) for learner in learners}
    total = sum(targets.values())
    events = []
    for learner in learners:
        share = max(1, round(count * targets[learner.user_id] / total))
        events += _learner_events(learner, share, targets[learner.user_id], now, rng)
    events.sort(key=lambda item: item["started_at"])
    return events


def _target_ms(persona: Persona) -> int:
    return settings().minutes_for_plan(persona.plan) * 60_000 * persona.percent_of_limit // 100


def _learner_events(learner: Learner, count: int, target_ms: int, now: datetime, rng: random.Random) -> list[dict]:
    weights = [rng.uniform(3, 90) for _ in range(count)]  # seconds, before scaling to the target
    scale = target_ms / sum(weights)
    durations = [int(weight * scale) for weight in weights]
    durations[-1] += target_ms - sum(durations)  # exact total, to the millisecond
    window_start = max(learner.period_start, now - HISTORY)
    window_ms = max(int((now - window_start).total_seconds() * 1000), 1)
    offsets = sorted(rng.randrange(window_ms) for _ in range(count))
    run = uuid.uuid4().hex[:8]
    events, conversation, language, left_in_session = [], None, None, 0
    for index, (offset, duration_ms) in enumerate(zip(offsets, durations, strict=True)):
        if left_in_session == 0:
            conversation, language, left_in_session = (
                str(uuid.uuid4()),
                rng.choice(learner.persona.languages),
                rng.randint(3, 15),
            )
        left_in_session -= 1
        events.append({
            "event_id": f"demo-{run}-{learner.persona.plan}-{index}",
            "user_id": learner.user_id,
            "started_at": (window_start + timedelta(milliseconds=offset)).isoformat(),
            "seconds": duration_ms / 1000,
            "language": language,
            "conversation_id": conversation,
            "feature": "pronunciation_check" if rng.random() < 0.1 else "conversation",
        })  # fmt: skip
    return events


# -- sending ---------------------------------------------------------------------------------------------

Progress = Callable[[int], None]


class WebUnreachable(Exception):
    pass


def send_http(events: list[dict], url: str, token: str, progress: Progress) -> int:
    """POST the events in requests of EVENTS_PER_REQUEST; returns how many the web rejected."""
    rejected = 0
    for start in range(0, len(events), EVENTS_PER_REQUEST):
        chunk = events[start : start + EVENTS_PER_REQUEST]
        request = urllib.request.Request(
            f"{url.rstrip('/')}/v1/usage-events",
            data=json.dumps({"events": chunk}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                rejected += len(json.load(response)["rejected"])
        except urllib.error.HTTPError as exc:
            raise DemoError(f"the web answered {exc.code}: {exc.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if start == 0:
                raise WebUnreachable(str(exc)) from None
            raise DemoError(f"the web stopped answering: {exc}") from None
        progress(start + len(chunk))
    return rejected


def send_to_broker(events: list[dict], progress: Progress) -> None:
    for start in range(0, len(events), EVENTS_PER_REQUEST):
        app.send_task(BATCH_TASK, args=[events[start : start + EVENTS_PER_REQUEST]])
        progress(min(start + EVENTS_PER_REQUEST, len(events)))


def wait_until_recorded(learners: list[Learner], expected: int, timeout: float, progress: Progress) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with db.engine().connect() as conn:
            recorded = conn.execute(
                sa.text("SELECT count(*) FROM usage_events WHERE user_id = ANY(CAST(:ids AS uuid[]))"),
                {"ids": [learner.user_id for learner in learners]},
            ).scalar_one()
        progress(recorded)
        if recorded >= expected:
            return
        if time.monotonic() > deadline:
            raise DemoError(
                f"the worker recorded {recorded} of {expected} events in {timeout:.0f} s: is it running?"
                " (celery -A worker worker -Q usage,stripe,maintenance)"
            )
        time.sleep(0.2)


def progress_bar(label: str, total: int) -> Progress:
    """A plain progress line on stderr, redrawn in place."""

    def show(done: int) -> None:
        filled = 30 * done // max(total, 1)
        sys.stderr.write(f"\r{label:<10} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} events")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


# -- a live session ----------------------------------------------------------------------------------------


def live_session(learner: Learner, now: datetime) -> list[str]:
    """The learner talks as long as they are granted: the app reports every REPORT_EVERY seconds, uses what
    was granted, and stops the microphone when the grant is 0. The conversation's clock ends at `now`."""
    left = quota.check(learner.user_id, now).remaining_seconds
    clock = now - timedelta(seconds=left + REPORT_EVERY)
    start = functools.partial(sessions.start, user_id=learner.user_id, language=learner.persona.languages[0],
                              now=clock, feature="conversation")  # fmt: skip
    answer = sessions.run(start)
    assert isinstance(answer, sessions.Grant)
    lines = [f"live session of {learner.persona.email}, {left:.0f} s left, its app reporting every {REPORT_EVERY} s:"]
    used, elapsed, at = 0.0, 0, clock
    while answer.granted_ms:
        lines.append(f"  +{elapsed:>3} s  used {used:6.1f} s  granted {answer.granted_ms / 1000:5.1f} s")
        used += min(answer.granted_ms / 1000, REPORT_EVERY)
        elapsed += REPORT_EVERY
        at = clock + timedelta(seconds=elapsed)
        answer = sessions.run(functools.partial(sessions.heartbeat, session_id=answer.session_id, used_seconds=used,
                                                now=at))  # fmt: skip
        assert isinstance(answer, sessions.Grant), "the demo's session never goes silent"
    why = "the limit is reached" if answer.blocked else "other sessions hold the rest"
    lines.append(f"  +{elapsed:>3} s  used {used:6.1f} s  granted   0.0 s  cut: {why}")
    ended = sessions.run(functools.partial(sessions.end, session_id=answer.session_id, used_seconds=used, now=at))
    assert isinstance(ended, sessions.Closed)
    beyond = ended.beyond_grant_ms / 1000
    lines.append(f"  ended: {ended.recorded_ms / 1000:.1f} s recorded, {beyond:.1f} s of it beyond the grants")
    return lines


# -- summary -----------------------------------------------------------------------------------------------


def summary(learners: list[Learner], now: datetime) -> str:
    """Each learner's minutes, remaining quota and alerts, as a table."""
    alerts: dict[str, list[str]] = {learner.user_id: [] for learner in learners}
    with db.engine().connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT a.user_id::text, a.threshold_percent FROM usage_alerts a"
                " JOIN subscriptions s ON s.user_id = a.user_id AND s.current_period_start = a.period_start"
                " WHERE a.user_id = ANY(CAST(:ids AS uuid[])) ORDER BY a.threshold_percent"
            ),
            {"ids": list(alerts)},
        )
        for user_id, threshold in rows:
            alerts[user_id].append(f"{threshold}%")
    lines = [f"{'learner':<32} {'plan':<9} {'used min':>9} {'limit min':>10} {'left min':>9}  {'quota':<8} alerts"]
    for learner in learners:
        answer = quota.check(learner.user_id, now)
        lines.append(
            f"{learner.persona.email:<32} {answer.plan:<9} {answer.used_seconds / 60:>9.1f}"
            f" {answer.limit_seconds / 60:>10.0f} {answer.remaining_seconds / 60:>9.1f}"
            f"  {'blocked' if answer.blocked else 'open':<8} {', '.join(alerts[learner.user_id]) or '-'}"
        )
    return "\n".join(lines)


def run(url: str, token: str | None, count: int, timeout: float) -> None:
    """The whole demo; raises DemoError with what to fix when the system is not there."""
    with db.transaction() as conn:
        learners = create_learners(conn, utcnow())
    events = make_events(learners, count, utcnow(), random.Random())
    print(f"{len(learners)} demo learners ready; streaming {len(events)} microphone events", file=sys.stderr)
    rejected = 0
    if token:
        try:
            rejected = send_http(events, url, token, progress_bar("HTTP", len(events)))
            print(f"sent through {url}/v1/usage-events", file=sys.stderr)
        except WebUnreachable as exc:
            print(f"\nthe web at {url} does not answer ({exc}); sending to the broker instead", file=sys.stderr)
            token = None
    else:
        print("INGEST_API_TOKENS is empty: sending to the broker, as an app server does", file=sys.stderr)
    if not token:
        send_to_broker(events, progress_bar("broker", len(events)))
    if rejected:
        raise DemoError(f"the web rejected {rejected} demo events: see `python -m worker dead-letters list`")
    wait_until_recorded(learners, len(events), timeout, progress_bar("recorded", len(events)))
    free = next(learner for learner in learners if learner.persona.plan == "free")
    print("\n".join(live_session(free, utcnow())))
    print(summary(learners, utcnow()))
