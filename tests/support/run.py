"""This test run's identity and environment: its databases, its Redis database number, the variables the
worker reads. Imported before anything of `worker`, whose settings are read once per process.

Each run gets its own databases (`ws_test_<run>_*`, created by the fixtures and dropped at the end) and its
own Redis database number, claimed with a lock key, so parallel runs never see each other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from bench.harness import claim_redis_db, reset_redis

ROOT = Path(__file__).resolve().parent.parent.parent
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
