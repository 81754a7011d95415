"""Factories: learners as sign-up leaves them, and usage events as app servers send them."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import sqlalchemy as sa
from psycopg import sql

from worker import db
from worker.metering import pipeline


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


NOW = datetime(2027, 1, 1, 0, 30, tzinfo=UTC)  # just after a month and year boundary


HOUR = 3_600_000


def event(user: uuid.UUID, event_id: str, started: datetime, seconds: float, **extra: object) -> dict:
    return {
        "event_id": event_id,
        "user_id": str(user),
        "started_at": started.isoformat(),
        "seconds": seconds,
        "language": extra.pop("language", "en"),
        **extra,
    }


def make_users(count: int, timezones: tuple[str, ...] = ("UTC", "Asia/Kolkata", "America/New_York")) -> dict:
    with db.transaction() as conn:
        return {insert_user(conn, timezone=timezones[i % len(timezones)]): timezones[i % len(timezones)]
                for i in range(count)}  # fmt: skip


def make_events(users: dict, count: int, now: datetime, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    user_ids = list(users)
    return [
        event(
            rng.choice(user_ids),
            f"{seed}-{i}",
            now - timedelta(milliseconds=rng.randrange(0, 3 * 86_400_000)),
            rng.choice([0.5, 1, 2.25, 7.125, 30, 61.5, 3600]),
            language=rng.choice(["en", "zh", "pt-BR"]),
        )
        for i in range(count)
    ]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def use(conn: sa.Connection, user: uuid.UUID, started: datetime, seconds: float) -> None:
    """Meter one event that starts at `started`, as the worker does when it arrives right away."""
    event = {"event_id": uuid.uuid4().hex, "user_id": str(user), "started_at": started.isoformat(),
             "seconds": seconds, "language": "en"}  # fmt: skip
    assert pipeline.apply_events(conn, [event], started).accepted


def december_learners(count: int) -> list[uuid.UUID]:
    """Learners with usage in December 2026, committed."""
    with db.transaction() as conn:
        users = [insert_user(conn) for _ in range(count)]
        events = [
            {"event_id": f"dec-{user}", "user_id": str(user), "started_at": "2026-12-31T22:00:00Z", "seconds": 60,
             "language": "en"}
            for user in users
        ]  # fmt: skip
        pipeline.apply_events(conn, events, utc(2026, 12, 31, 23))
    return users
