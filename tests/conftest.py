"""Fixtures on the machine's real PostgreSQL, Redis and RabbitMQ, shared by the three kinds of tests:
`unit/` (no database), `integration/` (PostgreSQL and Redis) and `acceptance/` (real processes, servers
killed and restarted), whose own conftest files ask for the databases.

Each run gets its own databases, its own Redis database number (support/run.py) and, when a test asks for
RabbitMQ, its own vhost (`ws_test_<run>`), so parallel runs never see each other.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from support.factories import insert_user
from support.run import (
    PG_HOST,
    RUN_ID,
    SESSION_DB,
    TEMPLATE_DB,
    TEST_ENV,
    clear_data,
    create_database,
    drop_database,
)
from support.servers import shared_rabbitmq_vhost
from support.workers import Broker, WorkerProcess, producer_app, purge_queues

from bench.harness import release_redis


@pytest.fixture(scope="session")
def test_databases() -> Iterator[str]:
    """The template built once from schema.sql, and the session database cloned from it."""
    from worker import db

    db.migrate(f"{PG_HOST}/{TEMPLATE_DB}")
    create_database(SESSION_DB, template=TEMPLATE_DB)
    yield TEST_ENV["DATABASE_URL"]
    db.engine().dispose()
    drop_database(SESSION_DB)
    drop_database(TEMPLATE_DB)
    redis_lib.Redis.from_url(TEST_ENV["REDIS_URL"]).flushdb()
    shutil.rmtree(TEST_ENV["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


@pytest.fixture
def conn() -> Iterator[psycopg.Connection]:
    """A psycopg connection to the session database in a transaction that is rolled back."""
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as connection:
        yield connection
        connection.rollback()


@pytest.fixture
def connection():
    """A SQLAlchemy connection (the worker's engine) in a transaction that is rolled back (so nothing
    registered with db.after_commit runs)."""
    from worker import db

    with db.transaction(dry_run=True) as sa_connection:
        yield sa_connection


def _fresh_name() -> str:
    return f"ws_test_{RUN_ID}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def empty_database_url() -> Iterator[str]:
    name = _fresh_name()
    url = create_database(name)
    yield url
    drop_database(name)


@pytest.fixture
def fresh_database_url() -> Iterator[str]:
    """A new database built from schema.sql, for tests that must commit in isolation."""
    name = _fresh_name()
    url = create_database(name, template=TEMPLATE_DB)
    yield url
    drop_database(name)


@pytest.fixture
def make_user() -> Callable[..., uuid.UUID]:
    return insert_user


@pytest.fixture
def committed() -> Iterator[None]:
    """For tests that commit to the session database (real workers): everything is emptied afterwards."""
    clear_data()
    yield
    clear_data()


@pytest.fixture
def redis_client() -> redis_lib.Redis:
    from worker.cache import redis_client as client

    return client()


@pytest.fixture(scope="module")
def thread_worker() -> Iterator[object]:
    """A real Celery worker consuming the run's Redis from a thread of this process, for the tests of one
    module (it must not outlive them: later tests start worker processes of their own on the same queues)."""
    from celery.contrib.testing.worker import start_worker

    from worker.celery import app

    with start_worker(
        app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        queues=["usage", "stripe", "maintenance"],
        shutdown_timeout=30,
        loglevel="WARNING",
    ) as worker:
        yield worker


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def spawn(**kwargs: object) -> WorkerProcess:
        worker = WorkerProcess(**kwargs)  # type: ignore[arg-type]
        workers.append(worker)
        return worker

    yield spawn
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """This run's vhost on the machine's RabbitMQ."""
    with shared_rabbitmq_vhost(f"ws_test_{RUN_ID}") as url:
        yield url


@pytest.fixture(scope="session")
def rabbitmq_app(rabbitmq_url: str) -> Iterator[Any]:
    """The producer app of this run's RabbitMQ vhost."""
    with producer_app(rabbitmq_url) as producer:
        yield producer


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each broker in turn: the run's Redis database, then the run's RabbitMQ vhost (emptied first)."""
    from worker.celery import app

    if request.param == "redis":
        return Broker("redis", {}, app)
    producer = request.getfixturevalue("rabbitmq_app")
    purge_queues(producer)
    return Broker("rabbitmq", {"CELERY_BROKER_URL": request.getfixturevalue("rabbitmq_url")}, producer)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run's Redis database is free again however the run went (unit tests never start the databases)."""
    release_redis(TEST_ENV["REDIS_URL"])
