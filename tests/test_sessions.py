"""Live sessions against the real PostgreSQL and Redis: grants, reports, silence, Redis lost, plan and
period changes, repeats and reorders."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import TEST_ENV, environment, flush_redis, insert_user

from worker import db, maintenance, metering, quota, sessions
from worker.cache import live_grants_key, redis_client

pytestmark = pytest.mark.usefixtures("committed")

T0 = datetime(2031, 5, 10, 12, 0, tzinfo=UTC)  # inside May 2031, a free learner's calendar month
FREE_LIMIT_MS = 3_600_000


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_learner(used_seconds: float = 0, **profile: object) -> str:
    """A free learner who has used this much of May before T0 (one ordinary usage event)."""
    with db.transaction() as conn:
        user = str(insert_user(conn, **profile))
        if used_seconds:
            started = T0 - timedelta(hours=2)
            event = {"event_id": f"before-{user}", "user_id": user, "started_at": started.isoformat(),
                     "seconds": used_seconds, "language": "en"}  # fmt: skip
            assert metering.apply_events(conn, [event], T0).accepted
    return user


def start(user: str, now: datetime, **labels: object) -> sessions.Grant:
    answer = sessions.run(lambda conn: sessions.start(conn, user, labels.pop("language", "en"), now, **labels))
    assert isinstance(answer, sessions.Grant)
    return answer


def beat(session_id: str, used: float, now: datetime) -> sessions.Grant | sessions.Closed:
    return sessions.run(lambda conn: sessions.heartbeat(conn, session_id, used, now))


def end(session_id: str, used: float, now: datetime) -> sessions.Closed:
    answer = sessions.run(lambda conn: sessions.end(conn, session_id, used, now))
    assert isinstance(answer, sessions.Closed)
    return answer


def query(sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return conn.execute(sql, params).fetchall()


def session_row(session_id: str) -> dict:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return conn.execute("SELECT * FROM live_sessions WHERE session_id = %s", (session_id,)).fetchone()


def ledger(user: str) -> dict[str, tuple[datetime, int]]:
    rows = query("SELECT event_id, started_at, duration_ms FROM usage_events WHERE user_id = %s", user)
    return {event_id: (started, ms) for event_id, started, ms in rows if event_id.startswith("session:")}


def period_used_ms(user: str, now: datetime = T0) -> int:
    rows = query("SELECT used_ms FROM usage_periods WHERE user_id = %s AND period_start <= %s AND %s < period_end",
                 user, now, now)  # fmt: skip
    return rows[0][0] if rows else 0


def held(user: str) -> int | None:
    return sessions.held_ms(user)


def open_grants_ms(user: str) -> int:
    return query("SELECT COALESCE(sum(granted_ms), 0) FROM live_sessions WHERE user_id = %s AND state = 'open'",
                 user)[0][0]  # fmt: skip


# -- grants ------------------------------------------------------------------------------------------------


def test_a_session_is_granted_at_most_the_grant_seconds_and_records_its_usage_as_events() -> None:
    user = make_learner()
    first = start(user, T0, conversation_id=str(uuid.uuid4()), feature="conversation")
    assert (first.granted_ms, first.used_ms, first.blocked) == (60_000, 0, False)
    assert first.remaining_ms == FREE_LIMIT_MS - 60_000
    assert first.expires_at == at(120)

    second = beat(first.session_id, 20.5, at(21))
    assert (second.granted_ms, second.used_ms, second.beyond_grant_ms) == (60_000, 20_500, 0)
    assert second.remaining_ms == FREE_LIMIT_MS - 20_500 - 60_000
    assert ledger(user) == {f"session:{first.session_id}:0": (at(0.5), 20_500)}  # the 20.5 s up to now

    closed = end(first.session_id, 30, at(31))
    assert (closed.state, closed.recorded_ms, closed.beyond_grant_ms, closed.ended_at) == ("ended", 30_000, 0, at(31))
    assert ledger(user)[f"session:{first.session_id}:20500"] == (at(21.5), 9_500)
    assert period_used_ms(user) == 30_000
    assert held(user) == 0
    assert quota.check(user, at(32)).as_dict() | {"period_start": None, "period_end": None} == {
        "user_id": user, "plan": "free", "limit_seconds": 3600, "used_seconds": 30, "remaining_seconds": 3570,
        "reserved_seconds": 0, "blocked": False, "period_start": None, "period_end": None,
    }  # fmt: skip


def test_the_quota_counts_what_sessions_hold_as_not_remaining() -> None:
    user = make_learner(used_seconds=3500)
    before = quota.check(user, T0)
    assert (before.remaining_seconds, before.reserved_seconds) == (100, 0)
    first = start(user, T0)
    second = start(user, T0)
    assert (first.granted_ms, second.granted_ms, second.remaining_ms) == (60_000, 40_000, 0)
    during = quota.check(user, at(1))
    assert (during.used_seconds, during.reserved_seconds, during.remaining_seconds, during.blocked) == (
        3500, 100, 0, False
    )  # fmt: skip
    flush_redis()  # the answer then comes from PostgreSQL, the held seconds too
    assert quota.check(user, at(1)).reserved_seconds == 100


def test_an_unknown_user_or_session_and_bad_labels_are_refused() -> None:
    with pytest.raises(quota.UnknownUser):
        start(str(uuid.uuid4()), T0)
    with pytest.raises(sessions.UnknownSession):
        beat(str(uuid.uuid4()), 1, T0)
    with pytest.raises(sessions.UnknownSession):
        beat("not-a-session", 1, T0)
    user = make_learner()
    for labels, reason in [
        ({"language": "english"}, "language is not a language code"),
        ({"language": "en\n"}, "must not end in a newline"),
        ({"feature": "Big Feature"}, "feature must be a short lowercase name"),
        ({"conversation_id": "nope"}, "conversation_id is not a UUID"),
    ]:
        with pytest.raises(sessions.BadInput, match=reason):
            start(user, T0, **labels)
    assert query("SELECT count(*) FROM live_sessions")[0][0] == 0


def test_a_total_cannot_grow_more_than_the_time_allows() -> None:
    user = make_learner()
    session = start(user, T0)
    with pytest.raises(sessions.BadInput, match="more than the 10.0 s since the session's last report ended"):
        beat(session.session_id, 311, at(10))  # 300 s of clock disagreement allowed, not 301
    with pytest.raises(sessions.BadInput, match="used_seconds must be a finite number >= 0"):
        beat(session.session_id, -1, at(10))
    assert isinstance(beat(session.session_id, 310, at(10)), sessions.Grant)
    assert ledger(user) == {f"session:{session.session_id}:0": (at(0), 310_000)}  # starts after the last report
