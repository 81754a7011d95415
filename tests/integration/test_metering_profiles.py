"""A user's usage belongs to their profile: the ledger and the conversation keys keep user ids without a
foreign key, so a batch locks its users' profiles itself, and deleting (or truncating) profiles deletes
their usage as ON DELETE CASCADE did."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors
from support.factories import NOW, event, insert_user
from support.run import TEST_ENV

from worker import db
from worker.metering import pipeline

CONVERSATION = str(uuid.UUID(int=7))


def usage_of(conn: object, user: uuid.UUID) -> tuple[int, int]:
    """(ledger rows, conversation keys) of the user."""
    raw = conn if isinstance(conn, psycopg.Connection) else conn.connection.driver_connection  # type: ignore[attr-defined]
    return raw.execute(
        "SELECT (SELECT count(*) FROM usage_events WHERE user_id = %(u)s),"
        " (SELECT count(*) FROM usage_hour_conversations WHERE user_id = %(u)s)",
        {"u": user},
    ).fetchone()


def meter(connection: sa.Connection, user: uuid.UUID, tag: str) -> None:
    batch = [
        event(user, f"{tag}-{n}", NOW - timedelta(minutes=n + 1), 30, conversation_id=CONVERSATION) for n in range(3)
    ]
    outcome = pipeline.apply_events(connection, batch, NOW)
    assert len(outcome.accepted) == 3


def test_deleting_profiles_deletes_their_usage_and_only_theirs(connection: sa.Connection) -> None:
    gone, kept, also_gone = (insert_user(connection) for _ in range(3))
    for user in (gone, kept, also_gone):
        meter(connection, user, str(user))
    assert usage_of(connection, gone) == (3, 1)

    connection.execute(sa.text("DELETE FROM auth.users WHERE id = ANY(:ids)"), {"ids": [gone, also_gone]})

    assert usage_of(connection, gone) == (0, 0) == usage_of(connection, also_gone)
    assert usage_of(connection, kept) == (3, 1)


def test_users_may_delete_their_own_profile_though_they_cannot_touch_the_ledger(connection: sa.Connection) -> None:
    user = insert_user(connection)
    meter(connection, user, "own")
    connection.execute(sa.text("SET LOCAL ROLE authenticated"))
    connection.execute(
        sa.text("SELECT set_config('request.jwt.claims', :claims, true)"),
        {"claims": json.dumps({"sub": str(user), "role": "authenticated"})},
    )
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), connection.begin_nested():
        connection.execute(sa.text("DELETE FROM usage_events"))
    assert connection.execute(sa.text("DELETE FROM profiles WHERE id = :u"), {"u": user}).rowcount == 1
    connection.execute(sa.text("RESET ROLE"))
    assert usage_of(connection, user) == (0, 0)


def test_truncating_profiles_takes_the_usage_with_them(connection: sa.Connection) -> None:
    meter(connection, insert_user(connection), "truncated")
    connection.execute(sa.text("TRUNCATE profiles CASCADE"))
    assert connection.execute(sa.text("SELECT count(*) FROM usage_hour_conversations")).scalar_one() == 0
    assert connection.execute(sa.text("SELECT count(*) FROM usage_events")).scalar_one() == 0


def test_a_profile_cannot_go_while_a_batch_records_its_usage(committed: None) -> None:
    with db.transaction() as setup:
        user = insert_user(setup)
        meter(setup, user, "first")  # the hours, period and subscription exist: the next batch only adds to them
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as deleter:
        with db.transaction() as connection:
            meter(connection, user, "racing")
            # The row lock a DELETE of the profile must take first: the batch holds the profile itself
            # (KEY SHARE, until it commits), not only the period and subscription rows deleting it cascades to.
            with pytest.raises(errors.LockNotAvailable):
                deleter.execute("SELECT 1 FROM profiles WHERE id = %s FOR UPDATE NOWAIT", (user,))
            deleter.rollback()
        assert usage_of(deleter, user) == (6, 1)
        assert deleter.execute("DELETE FROM profiles WHERE id = %s", (user,)).rowcount == 1
        deleter.commit()
        assert usage_of(deleter, user) == (0, 0)


def test_a_batch_after_the_profile_went_rejects_its_events(connection: sa.Connection) -> None:
    user = insert_user(connection)
    connection.execute(sa.text("DELETE FROM profiles WHERE id = :u"), {"u": user})
    outcome = pipeline.apply_events(connection, [event(user, "late", NOW - timedelta(minutes=1), 5)], NOW)
    assert [r.reason for r in outcome.rejected] == [f"unknown user_id {user}"]
    assert usage_of(connection, user) == (0, 0)
