"""PostgreSQL access: one SQLAlchemy engine per process, the schema migration, error classes.

Celery's prefork pool forks after import, and a connection pool must never cross a fork (two processes
would talk over one socket), so the engine is created lazily and forgotten in every forked child.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import sqlalchemy as sa
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy.engine import Connection, Engine, make_url

from worker.config import settings
from worker.logs import get_logger

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
MIGRATION_LOCK_ID = 0x77736D69  # advisory lock key: "wsmi"

_engine: Engine | None = None
log = get_logger(__name__)


def sqlalchemy_url(database_url: str) -> str:
    """The DATABASE_URL spelled for SQLAlchemy's psycopg 3 driver."""
    url = make_url(database_url)
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def create_db_engine(database_url: str, pool_size: int = 5) -> Engine:
    return sa.create_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=5,
        pool_pre_ping=True,  # a restarted PostgreSQL leaves dead sockets in the pool
        pool_recycle=1800,  # seconds
        connect_args={
            "connect_timeout": 5,
            "application_name": f"worldspeak-worker:{os.getpid()}",
            "options": session_options(),
        },
    )


def session_options() -> str:
    """Settings of every session the worker opens. timezone: date_trunc and ::date on timestamptz mean
    UTC whatever the server says. lock_timeout: no statement waits longer for a row lock (the batch is
    retried). idle_in_transaction_session_timeout: a transaction whose process stopped answering (paused,
    hung, cut off) is ended by the server, releasing its locks, and its message is delivered again."""
    config = settings()
    return (
        "-c timezone=UTC"
        f" -c lock_timeout={round(config.pg_lock_timeout * 1000)}"
        f" -c idle_in_transaction_session_timeout={round(config.pg_idle_in_transaction_timeout * 1000)}"
    )


def engine() -> Engine:
    """This process's engine, created on first use."""
    global _engine
    if _engine is None:
        _engine = create_db_engine(settings().database_url)
    return _engine


def _forget_engine_after_fork() -> None:
    global _engine
    if _engine is not None:
        _engine.dispose(close=False)  # the parent's sockets stay the parent's
    _engine = None


os.register_at_fork(after_in_child=_forget_engine_after_fork)


# -- transactions and what runs after their commit ------------------------------------------------------
#
# Effects outside PostgreSQL (quota answers in Redis, tasks sent to the broker, metrics) must follow the
# commit of the rows they describe, never precede it and never survive its rollback. `after_commit`
# registers them on the connection; `transaction()` runs them once its commit has succeeded. The few effects
# taken ahead of the commit (a live-session reservation in Redis) register their undoing with
# `after_rollback`. Savepoints keep their own frame: what was registered inside a savepoint that rolls back
# is undone (its after_rollback callbacks run, its after_commit ones are dropped) with it.


@dataclass
class _Frame:
    commit: list[Callable[[], None]] = field(default_factory=list)
    rollback: list[Callable[[], None]] = field(default_factory=list)

    def absorb(self, inner: _Frame) -> None:
        self.commit += inner.commit
        self.rollback += inner.rollback


# Per open connection of transaction(): a stack of frames, one per savepoint. Keyed by the Connection object
# itself (not Connection.info, which belongs to the DBAPI connection and is gone once it breaks).
_frames: weakref.WeakKeyDictionary[Connection, list[_Frame]] = weakref.WeakKeyDictionary()


@contextmanager
def transaction(dry_run: bool = False) -> Iterator[Connection]:
    """A connection in a transaction that commits when the block ends (rolls back with `dry_run`, or on
    error). Callbacks registered with `after_commit` run once the commit has succeeded, in order; those
    registered with `after_rollback` run when it rolled back instead."""
    with engine().connect() as connection:
        frames = [_Frame()]
        _frames[connection] = frames
        try:
            with connection.begin() as outer:
                yield connection
                if dry_run:
                    outer.rollback()
        except BaseException:
            _run_rollback_callbacks(frames)
            raise
        finally:
            _frames.pop(connection, None)
    if dry_run:
        _run_rollback_callbacks(frames)
        return
    for callback in frames[0].commit:
        callback()


def _run_rollback_callbacks(frames: list[_Frame]) -> None:
    """Newest first. Each is best effort: the failure that rolled the transaction back is what the caller
    must see, not a failure of undoing."""
    for frame in reversed(frames):
        for callback in reversed(frame.rollback):
            try:
                callback()
            except Exception:
                log.exception("after_rollback_failed")


def _frames_of(connection: Connection) -> list[_Frame]:
    frames = _frames.get(connection)
    if frames is None:
        raise RuntimeError("after_commit and after_rollback need a connection of db.transaction()")
    return frames


def after_commit(connection: Connection, callback: Callable[[], None]) -> None:
    """Run `callback` once the `transaction()` that `connection` belongs to has committed; never if it (or
    the savepoint the call is in) rolls back. Raises outside `transaction()`, where no commit would run it."""
    _frames_of(connection)[-1].commit.append(callback)


def after_rollback(connection: Connection, callback: Callable[[], None]) -> None:
    """Run `callback` if the `transaction()` (or the savepoint the call is in) rolls back: the undoing of an
    effect taken ahead of the commit. Never runs once the transaction has committed."""
    _frames_of(connection)[-1].rollback.append(callback)


@sa.event.listens_for(Engine, "savepoint")
def _open_frame(connection: Connection, _name: str) -> None:
    frames = _frames.get(connection)
    if frames is not None:
        frames.append(_Frame())


@sa.event.listens_for(Engine, "release_savepoint")
def _keep_frame(connection: Connection, _name: str, _context: object) -> None:
    frames = _frames.get(connection)
    if frames is not None and len(frames) > 1:
        released = frames.pop()
        frames[-1].absorb(released)


@sa.event.listens_for(Engine, "rollback_savepoint")
def _undo_frame(connection: Connection, _name: str, _context: object) -> None:
    frames = _frames.get(connection)
    if frames is not None and len(frames) > 1:
        _run_rollback_callbacks([frames.pop()])


def set_actor(connection: Connection, actor: str) -> None:
    """Name who changes rows in this transaction: schema.sql's audit trigger writes it to audit_logs.actor."""
    connection.execute(sa.text("SELECT set_config('app.actor', :actor, true)"), {"actor": actor})


def set_local(connection: Connection, setting: str, value: str) -> None:
    """A PostgreSQL setting for the rest of this transaction (e.g. a job's own lock_timeout)."""
    connection.execute(sa.text("SELECT set_config(:setting, :value, true)"), {"setting": setting, "value": value})


# SQLSTATEs worth another try: the same work succeeds once the competing transaction or outage is gone.
TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
    "25P03",  # idle_in_transaction_session_timeout: this session was cut; the work was rolled back
    "57P01",  # admin_shutdown (server restarting)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (server starting)
    "53300",  # too_many_connections
}


class StaleRead(Exception):
    """Rows read without a lock changed before they were locked: the same work, run again, succeeds."""


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is worth retrying (deadlock, serialization, lost connection, stale read)."""
    if isinstance(exc, StaleRead):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    if isinstance(exc, sa.exc.TimeoutError):  # pool exhausted
        return True
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate or ""
        if sqlstate in TRANSIENT_SQLSTATES or sqlstate.startswith("08"):  # class 08: connection exception
            return True
        # No SQLSTATE at all: the connection broke before the server could answer.
        return isinstance(exc, psycopg.OperationalError) and not sqlstate
    return isinstance(exc, (ConnectionError, TimeoutError))


def ensure_database(database_url: str) -> bool:
    """Create the database named by the URL when it is missing. Returns whether it was created."""
    url = make_url(database_url)
    name = url.database
    if not name:
        raise ValueError(f"DATABASE_URL names no database: {url.render_as_string(hide_password=True)}")
    admin = url.set(database="postgres").set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except pg_errors.DuplicateDatabase:  # another migrate created it first
            return False
        return True


def migrate(database_url: str | None = None) -> None:
    """Apply schema.sql in one transaction under an advisory lock; safe to repeat and to race."""
    database_url = database_url or settings().database_url
    ensure_database(database_url)
    url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    schema = SCHEMA_PATH.read_text(encoding="utf-8")
    with psycopg.connect(url, connect_timeout=5) as conn:
        conn.add_notice_handler(_log_server_message)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
        conn.execute(schema)  # several statements: psycopg sends them with the simple query protocol
        conn.commit()


def _log_server_message(diagnostic: psycopg.errors.Diagnostic) -> None:
    """A warning the server sent while schema.sql ran: the file keeps its own runs quiet, so it deserves a look."""
    log.warning("migrate_server_message", severity=diagnostic.severity, message=diagnostic.message_primary)
