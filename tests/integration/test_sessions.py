"""Live sessions against the real PostgreSQL and Redis: grants, reports, silence, Redis lost, plan and
period changes, repeats and reorders."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from freezegun import freeze_time
from support.factories import insert_user
from support.run import TEST_ENV, flush_redis
from support.stripe import new_id, price, stripe_event, subscription, ts

from worker import cli, db, quota, sessions
from worker.cache import live_grants_key, redis_client
from worker.celery import app
from worker.maintenance import jobs
from worker.metering import pipeline
from worker.stripe import inbox, webhook
from worker.tasks.maintenance import expire_sessions

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
            assert pipeline.apply_events(conn, [event], T0).accepted
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
        ({"language": "en\n"}, "language is not a language code"),  # anchored to the whole string
        ({"feature": "Big Feature"}, "feature must be a short lowercase name"),
        ({"conversation_id": "nope"}, "conversation_id is not a UUID"),
    ]:
        with pytest.raises(sessions.BadInput, match=reason):
            start(user, T0, **labels)
    assert query("SELECT count(*) FROM live_sessions")[0][0] == 0


def test_a_total_cannot_grow_more_than_the_time_allows() -> None:
    user = make_learner()
    session = start(user, T0)
    with pytest.raises(sessions.BadInput, match=r"more than the 10\.0 s since the session's last report ended"):
        beat(session.session_id, 311, at(10))  # 300 s of clock disagreement allowed, not 301
    with pytest.raises(sessions.BadInput, match="used_seconds must be a finite number >= 0"):
        beat(session.session_id, -1, at(10))
    assert isinstance(beat(session.session_id, 310, at(10)), sessions.Grant)
    assert ledger(user) == {f"session:{session.session_id}:0": (at(0), 310_000)}  # starts after the last report


def test_grants_never_outrun_what_remains_and_usage_beyond_a_grant_is_recorded_and_flagged() -> None:
    user = make_learner(used_seconds=3540)  # 60 s left
    first, second = start(user, T0), start(user, T0)
    assert (first.granted_ms, second.granted_ms) == (60_000, 0)
    assert beat(second.session_id, 0, at(5)).granted_ms == 0  # nothing left while the first holds it all
    used = beat(first.session_id, 40, at(40))
    assert (used.granted_ms, used.remaining_ms) == (20_000, 0)  # 20 s left, all granted again to the first
    over = beat(first.session_id, 70, at(70))  # 10 s past its grant of 20 s: recorded, flagged
    assert (over.granted_ms, over.used_ms, over.beyond_grant_ms, over.blocked) == (0, 70_000, 10_000, True)
    assert session_row(first.session_id)["beyond_grant_ms"] == 10_000
    assert period_used_ms(user) == 3_610_000
    closed = end(first.session_id, 71, at(71))
    assert (closed.recorded_ms, closed.beyond_grant_ms) == (71_000, 11_000)
    assert sum(ms for _, ms in ledger(user).values()) == 71_000
    assert held(user) == 0 and beat(second.session_id, 0, at(72)).granted_ms == 0


# -- silence -------------------------------------------------------------------------------------------


def test_a_silent_session_expires_after_the_ttl_its_grant_returns_and_its_usage_is_recorded_once() -> None:
    user = make_learner(used_seconds=3540)
    silent = start(user, T0)
    beat(silent.session_id, 15, at(15))
    waiting = start(user, at(16))
    assert (held(user), waiting.granted_ms) == (45_000, 0)

    assert sessions_expire(at(135)) == 0  # silent 120 s: not longer than the TTL yet
    assert sessions_expire(at(135.001)) == 1
    assert session_row(silent.session_id)["state"] == "expired" and held(user) == 0
    assert beat(waiting.session_id, 0, at(136)).granted_ms == 45_000  # what the silent one held returned

    late = beat(silent.session_id, 20, at(137))  # the app comes back: too late, nothing recorded
    assert isinstance(late, sessions.Closed) and (late.state, late.recorded_ms) == ("expired", 15_000)
    final = end(silent.session_id, 20, at(138))  # its final total is recorded, beyond any grant
    assert (final.state, final.recorded_ms, final.beyond_grant_ms) == ("expired", 20_000, 5_000)
    assert end(silent.session_id, 20, at(139)) == final
    assert {key: ms for key, (_, ms) in ledger(user).items()} == {
        f"session:{silent.session_id}:0": 15_000, f"session:{silent.session_id}:15000": 5_000,
    }  # fmt: skip
    assert period_used_ms(user) == 3_560_000


def sessions_expire(now: datetime) -> int:
    with db.transaction() as conn:
        expired = sessions.expire(conn, now)
    return expired.count  # the grants returned once that committed


def test_the_next_call_meets_a_silent_session_without_waiting_for_the_beat() -> None:
    user = make_learner(used_seconds=3540)
    silent = start(user, T0)
    other = start(user, at(200))  # the silent one ends in this call, before this grant is computed
    assert other.granted_ms == 60_000
    assert session_row(silent.session_id)["state"] == "expired"
    assert beat(silent.session_id, 1, at(201)) == sessions.Closed(silent.session_id, "expired", 0, 0, at(200))
    own = start(user, at(300))
    closed = beat(own.session_id, 0, at(421))  # silent 121 s: it meets its own silence
    assert isinstance(closed, sessions.Closed) and closed.state == "expired"


# -- Redis lost ----------------------------------------------------------------------------------------


def test_redis_flushed_mid_session_grants_resume_from_postgresql_and_nothing_is_over_granted() -> None:
    user = make_learner(used_seconds=3540)
    first, second = start(user, T0), start(user, T0)
    beat(first.session_id, 10, at(10))  # first: 50 s granted, 10 used, 0 left for the second
    flush_redis()
    assert held(user) is None
    again = beat(second.session_id, 0, at(11))
    assert again.granted_ms == 0  # rebuilt from the rows: the first still holds the other 50 s
    assert held(user) == 50_000
    resumed = beat(first.session_id, 20, at(20))
    assert (resumed.granted_ms, resumed.beyond_grant_ms) == (40_000, 0)
    third = start(user, at(21))
    assert third.granted_ms == 0
    assert period_used_ms(user) + open_grants_ms(user) <= FREE_LIMIT_MS


def test_a_reservation_restored_older_than_postgresql_is_rebuilt_not_trusted() -> None:
    user = make_learner(used_seconds=3540)
    first = start(user, T0)
    snapshot = redis_client().hgetall(live_grants_key(user))
    beat(first.session_id, 1, at(1))
    second = start(user, at(2))  # the first holds 59 s; the second gets 0
    redis_client().delete(live_grants_key(user))
    redis_client().hset(live_grants_key(user), mapping=snapshot)  # as an old AOF would bring it back
    assert beat(first.session_id, 1, at(3)).granted_ms == 59_000
    assert beat(second.session_id, 0, at(4)).granted_ms == 0


def test_a_settle_that_never_came_holds_back_more_never_less(monkeypatch: pytest.MonkeyPatch) -> None:
    user = make_learner(used_seconds=3540)
    first = start(user, T0)
    with monkeypatch.context() as died:  # committed, and its process died before the after-commit step
        died.setattr(sessions, "_settle", lambda *args: None)
        beat(first.session_id, 30, at(30))
    assert held(user) == 60_000  # 30 s used and 30 s granted, still pending
    assert start(user, at(31)).granted_ms == 0
    assert beat(first.session_id, 30, at(32)).granted_ms == 30_000
    assert held(user) == 30_000
    with monkeypatch.context() as died:  # an end whose release never came
        died.setattr(sessions, "_settle", lambda *args: None)
        end(first.session_id, 30, at(33))
    assert held(user) == 30_000
    assert start(user, at(34)).granted_ms == 30_000  # the user's next call drops what closed sessions held


def test_a_start_that_rolls_back_leaves_no_reservation() -> None:
    user = make_learner(used_seconds=3540)
    sessions.rebuild(user, T0)  # what sessions.run does first for a user Redis holds nothing for
    with pytest.raises(RuntimeError), db.transaction() as conn:
        sessions.start(conn, user, "en", T0)
        assert held(user) == 60_000
        raise RuntimeError("the commit failed")  # the rollback undoes the reservation (db.after_rollback)
    assert held(user) == 0
    assert start(user, at(1)).granted_ms == 60_000


# -- plan and period changes -------------------------------------------------------------------------------


def deliver_stripe(event: dict, now: datetime) -> None:
    with db.transaction() as conn:
        webhook.store(conn, event, now)
        processed = inbox.process(conn, event["id"], now)  # its commit invalidates the user's quota: the
    assert processed.outcome == "applied"  # signal the reservations follow


def test_an_upgrade_grants_more_at_the_next_heartbeat_and_a_cancellation_to_free_shrinks_the_grants() -> None:
    user = make_learner(used_seconds=3590)  # 10 s of May left
    first = start(user, T0)
    assert first.granted_ms == 10_000
    subscription_id, customer = new_id("sub"), new_id("cus")
    paid = subscription(subscription_id, customer, user_id=uuid.UUID(user), price_object=price("price_standard"),
                        start=datetime(2031, 5, 1, tzinfo=UTC), end=datetime(2031, 6, 1, tzinfo=UTC))  # fmt: skip
    deliver_stripe(stripe_event("customer.subscription.created", paid, ts(at(1))), at(1))
    upgraded = beat(first.session_id, 5, at(5))
    assert (upgraded.granted_ms, upgraded.blocked) == (60_000, False)  # 900 minutes this month
    second = start(user, at(6))
    assert second.granted_ms == 60_000

    canceled = subscription(subscription_id, customer, status="canceled", canceled_at=ts(at(10)))
    deliver_stripe(stripe_event("customer.subscription.deleted", canceled, ts(at(10))), at(10))
    # Back on the free plan for the rest of the period: 3595 s used of 3600, and 120 s still held. Each
    # grant shrinks at its session's next call; what they were granted and use meanwhile is recorded.
    shrunk = beat(first.session_id, 15, at(15))
    assert (shrunk.granted_ms, shrunk.blocked, shrunk.beyond_grant_ms) == (0, True, 0)
    assert beat(second.session_id, 9, at(15)).granted_ms == 0
    assert start(user, at(16)).granted_ms == 0
    assert quota.check(user, at(17)).reserved_seconds == 0


def test_a_reset_mid_session_starts_the_new_periods_grant_and_usage_is_split_at_the_boundary() -> None:
    may_end = datetime(2031, 6, 1, tzinfo=UTC)
    user = make_learner(used_seconds=3000)  # 600 s of May left
    talking = start(user, may_end - timedelta(seconds=30))
    with db.transaction() as conn:
        jobs.reset_monthly_usage(conn, may_end + timedelta(seconds=5))
    across = beat(talking.session_id, 40, may_end + timedelta(seconds=10))  # 30 s in May, 10 s in June
    assert (across.granted_ms, across.remaining_ms) == (60_000, FREE_LIMIT_MS - 10_000 - 60_000)
    assert period_used_ms(user, may_end - timedelta(seconds=1)) == 3_030_000
    assert period_used_ms(user, may_end) == 10_000

    exhausted = make_learner(used_seconds=3590)
    stopped = start(exhausted, may_end - timedelta(seconds=20))
    cut = beat(stopped.session_id, 10, may_end - timedelta(seconds=10))
    assert (cut.granted_ms, cut.blocked) == (0, True)  # the app stops the microphone here
    june = beat(stopped.session_id, 10, may_end + timedelta(seconds=1))  # the period turned: a fresh grant
    assert (june.granted_ms, june.blocked) == (60_000, False)
    with db.transaction() as conn:
        jobs.reset_monthly_usage(conn, may_end + timedelta(seconds=2))
    assert beat(stopped.session_id, 40, may_end + timedelta(seconds=31)).granted_ms == 60_000
    assert period_used_ms(exhausted, may_end) == 30_000


# -- repeats and reorders --------------------------------------------------------------------------------


def test_heartbeats_and_ends_repeated_retried_and_reordered_are_exact() -> None:
    user = make_learner()
    session = start(user, T0).session_id
    first = beat(session, 10, at(10))
    assert beat(session, 10, at(10)) == first  # a retry after a lost answer: the same answer
    assert beat(session, 20, at(20)).used_ms == 20_000
    late = beat(session, 15, at(21))  # an older total arriving after a newer one
    assert (late.used_ms, late.granted_ms, late.expires_at) == (20_000, 60_000, at(140))
    closed = end(session, 30, at(30))
    assert end(session, 30, at(31)) == closed
    assert end(session, 25, at(32)) == closed
    assert beat(session, 30, at(33)) == closed
    assert {key: ms for key, (_, ms) in ledger(user).items()} == {
        f"session:{session}:0": 10_000, f"session:{session}:10000": 10_000, f"session:{session}:20000": 10_000,
    }  # fmt: skip
    assert period_used_ms(user) == 30_000


def test_the_same_heartbeat_sent_at_once_from_many_threads_is_recorded_once() -> None:
    user = make_learner()
    session = start(user, T0).session_id
    with ThreadPoolExecutor(8) as pool:
        for step in range(1, 6):
            answers = list(pool.map(beat, [session] * 8, [7 * step] * 8, [at(10 * step)] * 8))
            assert {answer.used_ms for answer in answers} == {7_000 * step}
    assert sum(ms for _, ms in ledger(user).values()) == 35_000
    assert period_used_ms(user) == 35_000


# -- the beat job and the command line -----------------------------------------------------------------------


def test_sessions_expire_runs_on_the_beat_in_the_maintenance_queue() -> None:
    assert app.conf.beat_schedule["sessions.expire"] == {
        "task": "sessions.expire", "schedule": 30.0, "options": {"expires": 30.0}
    }  # fmt: skip
    assert app.amqp.router.route({}, "sessions.expire")["queue"].name == "maintenance"


def test_the_sessions_expire_task_ends_silent_sessions_and_records_its_run() -> None:
    user = make_learner()
    silent, talking = start(user, T0).session_id, start(user, T0).session_id
    beat(talking, 1, at(100))
    assert expire_sessions(now=at(121).isoformat()) == {"job": "expire_sessions", "ran": True, "expired": 1}
    with freeze_time(at(221)):  # now=None: the worker's clock
        assert expire_sessions() == {"job": "expire_sessions", "ran": True, "expired": 1}
    assert [session_row(s)["state"] for s in (silent, talking)] == ["expired", "expired"]
    assert query("SELECT last_succeeded_at FROM maintenance_runs WHERE job = 'expire_sessions'") == [(at(221),)]
    assert held(user) == 0
    with pytest.raises(ValueError, match="now must be an ISO-8601 time with a UTC offset"):
        expire_sessions(now="2031-05-10 12:00")


def test_sessions_list_shows_the_open_sessions_and_their_grants(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sessions", "list"]) == 0
    assert capsys.readouterr().out == "no open live sessions\n"
    user = make_learner(used_seconds=3590)
    talking = start(user, T0).session_id
    beat(talking, 4.5, at(5))
    quiet = start(user, at(6)).session_id
    with freeze_time(at(200)):
        assert cli.main(["sessions", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["session_id", "user_id", "lang", "started_at", "last", "report", "used", "s",
                                "granted", "s", "beyond", "s"]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert rows[talking][1:8] == [user, "en", "2031-05-10T12:00:00Z", "2031-05-10T12:00:05Z", "4.500", "5.500", "0.000"]
    assert rows[quiet][5:8] == ["0.000", "0.000", "0.000"]
    assert lines[-1] == "2 open sessions of 1 users"
    assert "silent: expires at the next sessions.expire" in " ".join(rows[talking])


def test_a_call_that_read_the_usage_before_another_sessions_report_committed_grants_no_more(monkeypatch) -> None:
    user = make_learner(used_seconds=3540)
    talking, waiting = start(user, T0), start(user, T0)  # 60 s and 0 s
    with db.engine().connect() as conn:
        before = quota.usage_of(conn, user, at(29))  # what a slow call read before the report below committed
    beat(talking.session_id, 30, at(30))  # 30 s used, 30 s granted again
    monkeypatch.setattr(quota, "usage_of", lambda conn, user_id, now: before)
    late = beat(waiting.session_id, 0, at(31))
    assert late.granted_ms == 0  # the reservation knows the 30 s used even though this call did not
    monkeypatch.undo()
    assert period_used_ms(user) + open_grants_ms(user) == FREE_LIMIT_MS
