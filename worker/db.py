"""PostgreSQL access: one SQLAlchemy engine per process, the schema migration, error classes.

Celery's prefork pool forks after import, and a connection pool must never cross a fork (two processes
would talk over one socket), so the engine is created lazily and forgotten in every forked child.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
            "options": "-c timezone=UTC",  # date_trunc and ::date on timestamptz mean UTC, whatever the server says
        },
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


_after_commit: ContextVar[list[Callable[[], None]] | None] = ContextVar("after_commit", default=None)


@contextmanager
def transaction() -> Iterator[Connection]:
    """A connection in a transaction that commits when the block ends and rolls back on error.

    Callbacks registered with `after_commit` inside the block run once the commit succeeded.
    """
    callbacks: list[Callable[[], None]] = []
    token = _after_commit.set(callbacks)
    try:
        with engine().begin() as connection:
            yield connection
    finally:
        _after_commit.reset(token)
    for callback in callbacks:
        callback()


def after_commit(callback: Callable[[], None]) -> None:
    """Run `callback` once the enclosing `transaction()` commits; never if it rolls back.

    Outside `transaction()` (a caller that manages its own transaction) nothing is registered.
    """
    callbacks = _after_commit.get()
    if callbacks is not None:
        callbacks.append(callback)


# SQLSTATEs worth another try: the same work succeeds once the competing transaction or outage is gone.
TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
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
