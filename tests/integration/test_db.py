"""worker.db: what runs after a commit (and after a rollback), savepoints included; the session settings;
which errors are worth another try."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from worker import db


def test_after_commit_runs_once_the_transaction_committed_in_order() -> None:
    ran: list[str] = []
    with db.transaction() as conn:
        db.after_commit(conn, lambda: ran.append("first"))
        db.after_commit(conn, lambda: ran.append("second"))
        assert ran == []  # not before the commit
    assert ran == ["first", "second"]


def test_nothing_registered_runs_when_the_transaction_rolls_back() -> None:
    ran: list[str] = []
    undone: list[str] = []
    with pytest.raises(RuntimeError), db.transaction() as conn:
        db.after_commit(conn, lambda: ran.append("commit"))
        db.after_rollback(conn, lambda: undone.append("first"))
        db.after_rollback(conn, lambda: undone.append("second"))
        raise RuntimeError("the work failed")
    assert ran == []
    assert undone == ["second", "first"]  # undone newest first


def test_a_dry_run_rolls_back_and_runs_the_rollback_callbacks() -> None:
    ran: list[str] = []
    with db.transaction(dry_run=True) as conn:
        conn.execute(sa.text("CREATE TEMP TABLE dry (x int)"))
        db.after_commit(conn, lambda: ran.append("commit"))
        db.after_rollback(conn, lambda: ran.append("rollback"))
    assert ran == ["rollback"]


def test_a_savepoint_that_rolls_back_takes_its_callbacks_with_it() -> None:
    ran: list[str] = []
    with db.transaction() as conn:
        db.after_commit(conn, lambda: ran.append("outer"))
        with pytest.raises(ValueError), conn.begin_nested():
            db.after_commit(conn, lambda: ran.append("rolled back"))
            db.after_rollback(conn, lambda: ran.append("undone at once"))
            raise ValueError
        assert ran == ["undone at once"]
        with conn.begin_nested():
            db.after_commit(conn, lambda: ran.append("released"))
            with conn.begin_nested():
                db.after_commit(conn, lambda: ran.append("nested and released"))
    assert ran == ["undone at once", "outer", "released", "nested and released"]


def test_a_savepoint_released_then_the_transaction_rolled_back_runs_nothing_of_it() -> None:
    ran: list[str] = []
    with pytest.raises(RuntimeError), db.transaction() as conn:
        with conn.begin_nested():
            db.after_commit(conn, lambda: ran.append("commit"))
            db.after_rollback(conn, lambda: ran.append("rollback"))
        raise RuntimeError
    assert ran == ["rollback"]


def test_a_failing_undo_does_not_hide_why_the_transaction_failed() -> None:
    def broken() -> None:
        raise OSError("redis is gone")

    with pytest.raises(RuntimeError, match="the real failure"), db.transaction() as conn:
        db.after_rollback(conn, broken)
        raise RuntimeError("the real failure")


def test_registering_outside_a_transaction_of_db_is_an_error() -> None:
    with db.engine().connect() as conn, conn.begin():
        with pytest.raises(RuntimeError, match=r"db\.transaction"):
            db.after_commit(conn, lambda: None)
        with pytest.raises(RuntimeError, match=r"db\.transaction"):
            db.after_rollback(conn, lambda: None)


def test_a_failed_commit_runs_the_rollback_callbacks_not_the_commit_ones() -> None:
    ran: list[str] = []
    with pytest.raises(sa.exc.DBAPIError), db.transaction() as conn:
        conn.execute(sa.text("CREATE TEMP TABLE deferred (x int UNIQUE DEFERRABLE INITIALLY DEFERRED)"))
        conn.execute(sa.text("INSERT INTO deferred VALUES (1), (1)"))  # refused only at COMMIT
        db.after_commit(conn, lambda: ran.append("commit"))
        db.after_rollback(conn, lambda: ran.append("rollback"))
    assert ran == ["rollback"]


def test_every_session_has_the_timeouts_and_utc() -> None:
    with db.engine().connect() as conn:
        settings = dict(
            conn.execute(
                sa.text(
                    "SELECT name, setting FROM pg_settings"
                    " WHERE name IN ('TimeZone', 'lock_timeout', 'idle_in_transaction_session_timeout')"
                )
            ).all()
        )
    assert settings == {"TimeZone": "UTC", "lock_timeout": "5000", "idle_in_transaction_session_timeout": "15000"}


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.errors.DeadlockDetected("deadlock"), True),
        (psycopg.errors.SerializationFailure("serialization"), True),
        (psycopg.errors.LockNotAvailable("lock_timeout"), True),
        (psycopg.errors.IdleInTransactionSessionTimeout("cut off"), True),
        (psycopg.errors.AdminShutdown("restarting"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (db.StaleRead("a period moved"), True),
        (ConnectionError("reset"), True),
        (psycopg.errors.UniqueViolation("duplicate"), False),
        (psycopg.errors.InvalidTextRepresentation("bad uuid"), False),
        (ValueError("a bug"), False),
    ],
)
def test_which_errors_are_worth_another_try(error: BaseException, transient: bool) -> None:
    assert db.is_transient(error) is transient
