"""Checks against the database: totals an independent reference computes from the events alone, the rows
metering wrote, and waiting for what workers commit."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import psycopg
import sqlalchemy as sa

from support.factories import utc
from support.run import ROOT, TEST_ENV
from worker import db


def tracking_rows(connection: sa.Connection, user: uuid.UUID) -> dict[tuple, dict]:
    rows = connection.execute(
        sa.text(
            "SELECT date, hour, microphone_ms, microphone_seconds, message_count, conversation_count,"
            " language_breakdown, feature_usage FROM usage_tracking WHERE user_id = :u"
        ),
        {"u": user},
    )
    return {(row.date, row.hour): row._asdict() for row in rows}


def reference(events: list[dict], timezone: str) -> tuple[dict, dict]:
    """(per-hour totals, per-calendar-month totals in the user's zone) for the distinct events."""
    unique = {}
    for item in events:
        unique.setdefault(item["event_id"], item)
    hours: dict[tuple, dict] = defaultdict(
        lambda: {"ms": 0, "messages": 0, "conversations": set(), "languages": defaultdict(int)}
    )
    months: dict[datetime, int] = defaultdict(int)
    zone = ZoneInfo(timezone)
    for item in unique.values():
        start = datetime.fromisoformat(item["started_at"]).astimezone(UTC)
        start = start.replace(microsecond=start.microsecond // 1000 * 1000)  # the contract keeps milliseconds
        end = start + timedelta(milliseconds=round(Decimal(str(item["seconds"])) * 1000))
        cursor = start
        while cursor < end:
            hour_start = cursor.replace(minute=0, second=0, microsecond=0)
            piece_end = min(end, hour_start + timedelta(hours=1))
            bucket = hours[hour_start.date(), hour_start.hour]
            ms = (piece_end - cursor) // timedelta(milliseconds=1)
            bucket["ms"] += ms
            bucket["languages"][item["language"]] += ms
            cursor = piece_end
        first = hours[start.date(), start.hour]
        first["messages"] += 1
        if item.get("conversation_id"):
            first["conversations"].add(item["conversation_id"])
        cursor = start
        while cursor < end:
            local = cursor.astimezone(zone)
            month_start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            next_month = (month_start + timedelta(days=32)).replace(day=1)
            month_end = next_month.replace(tzinfo=zone).astimezone(UTC)
            piece_end = min(end, month_end)
            months[month_start.astimezone(UTC)] += (piece_end - cursor) // timedelta(milliseconds=1)
            cursor = piece_end
    return hours, months


def scalar(query: str) -> int:
    with psycopg.connect(TEST_ENV["DATABASE_URL"]) as conn:
        return conn.execute(query).fetchone()[0]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def assert_exact(users: dict, events: list[dict]) -> None:
    """usage_tracking and usage_periods equal what the events alone say, user by user."""
    with db.engine().connect() as conn:
        for user, timezone in users.items():
            mine = [item for item in events if item["user_id"] == str(user)]
            hours, months = reference(mine, timezone)
            rows = conn.execute(
                sa.text("SELECT date, hour, microphone_ms, message_count FROM usage_tracking WHERE user_id = :u"),
                {"u": user},
            ).all()
            assert {(r.date, r.hour): (r.microphone_ms, r.message_count) for r in rows} == {
                key: (value["ms"], value["messages"]) for key, value in hours.items()
            }
            periods = conn.execute(
                sa.text("SELECT period_start, used_ms FROM usage_periods WHERE user_id = :u AND used_ms > 0"),
                {"u": user},
            ).all()
            assert dict(periods) == {start: ms for start, ms in months.items() if ms}
    assert scalar("SELECT count(*) FROM dead_letters") == 0


def archived_counts(users: list[uuid.UUID]) -> dict[str, int]:
    with db.engine().connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT s.user_id::text, s.current_period_start,"
                " (SELECT count(*) FROM usage_periods u WHERE u.user_id = s.user_id AND u.archived_at IS NOT NULL)"
                " FROM subscriptions s WHERE s.user_id = ANY(:users)"
            ),
            {"users": users},
        ).all()
    assert {row[1] for row in rows} == {utc(2027, 1, 1)}
    return {row[0]: row[2] for row in rows}


SCHEMA_PATH = ROOT / "schema.sql"


def schema_dump(database_url: str) -> str:
    """`pg_dump --schema-only`, without the random \\restrict key that recent versions print."""
    output = subprocess.run(
        ["pg_dump", "--schema-only", "--dbname", database_url], check=True, capture_output=True, text=True
    ).stdout
    return "\n".join(line for line in output.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))
