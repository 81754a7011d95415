"""Fixtures on the machine's real PostgreSQL, Redis and RabbitMQ.

Each run gets its own databases (`ws_test_<run>_*`, created here and dropped at the end), its own
Redis database number, claimed with a lock key, and, when a test asks for RabbitMQ, its own vhost
(`ws_test_<run>`), so parallel runs never see each other. The environment is set before `worker` is
imported, because its settings are read once per process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg import sql

from bench.harness import claim_redis_db, reset_redis
from tests.support.servers import shared_rabbitmq_vhost

ROOT = Path(__file__).resolve().parent.parent
PG_HOST = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
TEMPLATE_DB = f"ws_test_{RUN_ID}_tmpl"
SESSION_DB = f"ws_test_{RUN_ID}"


REDIS_DB = claim_redis_db(RUN_ID, numbers=range(1, 16), base_url=REDIS_BASE)
TEST_ENV = {
    "DATABASE_URL": f"{PG_HOST}/{SESSION_DB}",
    "REDIS_URL": f"{REDIS_BASE}/{REDIS_DB}",
    "LOG_LEVEL": "WARNING",
    "INGEST_API_TOKENS": "test-token-1,test-token-2",
    "STRIPE_WEBHOOK_SECRETS": "whsec_test_current,whsec_test_previous",
    "STRIPE_PRICE_PLANS": "price_standard=standard,price_premium=premium,price_enterprise=enterprise",
    "USAGE_FLUSH_INTERVAL": "0.05",
    "PROMETHEUS_MULTIPROC_DIR": f"/tmp/ws_test_metrics_{RUN_ID}",  # this run's processes only
}
os.environ.update(TEST_ENV)


def admin_connect() -> psycopg.Connection:
    return psycopg.connect(f"{PG_HOST}/postgres", autocommit=True)


def create_database(name: str, template: str | None = None) -> str:
    with admin_connect() as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        conn.execute(query)
    return f"{PG_HOST}/{name}"


def drop_database(name: str) -> None:
    with admin_connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session", autouse=True)
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


def _driver_connection(connection: object) -> psycopg.Connection:
    """psycopg connections pass through; a SQLAlchemy Connection gives its driver connection."""
    if isinstance(connection, psycopg.Connection):
        return connection
    return connection.connection.driver_connection  # type: ignore[attr-defined]


def insert_user(connection: object, **profile: object) -> uuid.UUID:
    """An auth.users row and its profile; profile fields override the defaults."""
    raw = _driver_connection(connection)
    user_id = profile.pop("id", None) or uuid.uuid4()
    fields = {
        "id": user_id,
        "email": f"{user_id}@learners.example",
        "full_name": "Test Learner",
        "native_language": "ja",
        "target_languages": ["en"],
        **profile,
    }
    raw.execute(
        "INSERT INTO auth.users (id, email, raw_app_meta_data, raw_user_meta_data) VALUES (%s, %s, '{}', '{}')",
        (user_id, fields["email"]),
    )
    columns = sql.SQL(", ").join(sql.Identifier(name) for name in fields)
    placeholders = sql.SQL(", ").join(sql.Placeholder() for _ in fields)
    raw.execute(sql.SQL("INSERT INTO profiles ({}) VALUES ({})").format(columns, placeholders), list(fields.values()))
    return user_id


@pytest.fixture
def make_user() -> Callable[..., uuid.UUID]:
    return insert_user


DATA_TABLES = [
    "auth.users",
    "profiles",
    "usage_events",
    "stripe_events",
    "stripe_reconcile_runs",
    "dead_letters",
    "maintenance_runs",
    "audit_logs",
    "conversation_scripts",
]


def flush_redis() -> None:
    """Empty the run's Redis database, keeping its claim and the broker's queue bindings."""
    reset_redis(TEST_ENV["REDIS_URL"], RUN_ID)


def clear_data() -> None:
    """Empty every table (the schema stays) and the run's Redis database."""
    with psycopg.connect(TEST_ENV["DATABASE_URL"], autocommit=True) as raw:
        raw.execute(f"TRUNCATE {', '.join(DATA_TABLES)} CASCADE")
    flush_redis()


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


@pytest.fixture(scope="session")
def thread_worker() -> Iterator[object]:
    """A real Celery worker consuming the run's Redis from a thread of this process."""
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


class WorkerProcess:
    """`celery worker` as a subprocess: what production runs, and what tests kill with SIGKILL."""

    def __init__(
        self, concurrency: int = 2, env: dict[str, str] | None = None, queues: str = "usage,stripe,maintenance"
    ):
        self.hostname = f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.log_path = Path(f"/tmp/{self.hostname.split('@')[0]}.log")
        command = [
            sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queues, "-c", str(concurrency),
            "-n", self.hostname, "--without-gossip", "--without-mingle", "-l", "INFO",
        ]  # fmt: skip
        self.log_file = self.log_path.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "LOG_LEVEL": "INFO", **(env or {})},  # INFO: the "ready." line tells us it is up
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            self.wait_ready()
        except Exception:
            self.kill()
            raise

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
            if "ready." in self.log_path.read_text():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the main process and its pool children: nothing gets to acknowledge or clean up."""
        subprocess.run(["pkill", "-KILL", "-P", str(self.process.pid)], check=False)
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log_file.close()


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


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Temporarily set environment variables (and forget cached settings) for one block."""
    from worker.config import settings

    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    settings.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        settings.cache_clear()


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """This run's vhost on the machine's RabbitMQ."""
    with shared_rabbitmq_vhost(f"ws_test_{RUN_ID}") as url:
        yield url


@contextmanager
def producer_app(broker_url: str) -> Iterator[Any]:
    """A Celery app of this process that publishes to `broker_url` (tasks are sent by name)."""
    from worker.celery import app, create_app

    with environment(CELERY_BROKER_URL=broker_url):
        producer = create_app()
    app.set_current()  # a new Celery app makes itself the current one
    try:
        yield producer
    finally:
        producer.close()


@pytest.fixture(scope="session")
def rabbitmq_app(rabbitmq_url: str) -> Iterator[Any]:
    """The producer app of this run's RabbitMQ vhost."""
    with producer_app(rabbitmq_url) as producer:
        yield producer


@dataclass(frozen=True)
class Broker:
    name: str
    env: dict[str, str]  # for worker subprocesses
    app: Any  # the Celery app producers in the test process publish with


def purge_queues(app: Any) -> None:
    with app.connection_for_write() as connection:
        for queue in app.conf.task_queues:
            bound = queue(connection.default_channel)
            bound.declare()
            bound.purge()


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each broker in turn: the run's Redis database, then the run's RabbitMQ vhost (emptied first)."""
    from worker.celery import app

    if request.param == "redis":
        return Broker("redis", {}, app)
    producer = request.getfixturevalue("rabbitmq_app")
    purge_queues(producer)
    return Broker("rabbitmq", {"CELERY_BROKER_URL": request.getfixturevalue("rabbitmq_url")}, producer)
