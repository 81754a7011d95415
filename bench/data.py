"""The benchmark's data: users, event streams, a ledger pre-loaded in bulk, and the totals the database
must show afterwards. Imported after the bench has set DATABASE_URL (worker settings are read once)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from worker import db, periods

SECONDS = (0.5, 1, 2.25, 7.125, 15, 30, 61.5)  # every one a whole number of milliseconds
LANGUAGES = ("en", "zh", "pt-BR")
FEATURES = ("conversation", "pronunciation_check", None)
TIMEZONES = ("UTC", "Asia/Tokyo", "America/New_York")
RECENT_MS = 3 * 3_600_000  # events started within the last three hours: several hour buckets per user


_CREATE_USERS = sa.text(
    """
    WITH numbers AS (
        SELECT n, md5(:tag || n)::uuid AS id FROM generate_series(1, :count) AS n
    ), auth_users AS (
        INSERT INTO auth.users (id, email, raw_app_meta_data, raw_user_meta_data)
        SELECT id, id || '@bench.example', '{}', '{}' FROM numbers
        RETURNING id
    )
    INSERT INTO profiles (id, email, full_name, native_language, target_languages, timezone)
    SELECT a.id, a.id || '@bench.example', 'Bench Learner', 'ja', '{en}', (CAST(:zones AS text[]))[1 + n % 3]
    FROM auth_users a JOIN numbers USING (id)
    """
)


def create_users(count: int, now: datetime) -> list[str]:
    """`count` users on the free plan, each with a subscription and a current period (as after their
    first event); returns their ids."""
    with db.transaction() as conn:
        conn.execute(_CREATE_USERS, {"tag": "bench-user-", "count": count, "zones": list(TIMEZONES)})
        user_ids = list(conn.execute(sa.text("SELECT id::text FROM profiles ORDER BY id")).scalars())
        spans = {user_id: periods.Span(now - timedelta(hours=1), now) for user_id in user_ids}
        periods.ensure_periods(conn, spans, now)
    return user_ids


@dataclass(frozen=True)
class Stream:
    """Events to send (duplicates included, in sending order) and what they must add up to."""

    events: list[dict]
    unique_ids: set[str]
    total_ms: int


def _conversation(user_id: str, number: int) -> str:
    return f"{user_id[:24]}{number:012x}"  # a UUID of the user's own, stable across runs


def make_stream(tag: str, count: int, users: list[str], now: datetime, duplicates: float, seed: int) -> Stream:
    """`count` distinct events from random users over the last hours, plus `duplicates` (a fraction)
    sent again later in the stream."""
    rng = random.Random(seed)
    events = []
    total_ms = 0
    now_ms = int(now.timestamp() * 1000)
    for number in range(count):
        user_id = rng.choice(users)
        seconds = rng.choice(SECONDS)
        started = datetime.fromtimestamp((now_ms - rng.randrange(RECENT_MS)) / 1000, UTC)
        event = {
            "event_id": f"{rng.getrandbits(32):08x}.{tag}.{number}",  # random first: ids land all over the index
            "user_id": user_id,
            "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "seconds": seconds,
            "language": rng.choice(LANGUAGES),
        }
        if rng.random() < 0.8:
            event["conversation_id"] = _conversation(user_id, rng.randrange(3))
        feature = rng.choice(FEATURES)
        if feature:
            event["feature"] = feature
        events.append(event)
        total_ms += round(seconds * 1000)
    unique_ids = {event["event_id"] for event in events}
    order = [(float(position), event) for position, event in enumerate(events)]
    for position in rng.sample(range(count), int(count * duplicates)):  # each sent again after its first sending
        order.append((rng.uniform(position + 0.5, count), events[position]))
    order.sort(key=lambda item: item[0])
    return Stream([event for _, event in order], unique_ids, total_ms)


# -- the ledger, pre-loaded in bulk ----------------------------------------------------------------------

_PRELOAD_LEDGER = sa.text(
    """
    WITH users AS (SELECT array_agg(id ORDER BY id) AS ids FROM profiles),
    rows AS (
        SELECT md5('preload-' || n) AS event_id, ids[1 + n % cardinality(ids)] AS user_id,
               CAST(:now AS timestamptz) - make_interval(secs => (n * 7919) % (30 * 86400)) AS started_at,
               1000 + (n % 60) * 1000 AS duration_ms, (CAST(:languages AS text[]))[1 + n % 3] AS language
        FROM users, generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS n
    ), inserted AS (
        INSERT INTO usage_events (event_id, user_id, started_at, duration_ms, language, received_at)
        SELECT event_id, user_id, started_at, duration_ms, language, CAST(:now AS timestamptz) FROM rows
        RETURNING user_id, started_at, duration_ms
    )
    INSERT INTO usage_tracking AS t (user_id, tracked_at, date, hour, microphone_ms, message_count)
    SELECT user_id, CAST(:now AS timestamptz), (date_trunc('hour', started_at) AT TIME ZONE 'UTC')::date,
           EXTRACT(HOUR FROM started_at AT TIME ZONE 'UTC')::int, sum(duration_ms), count(*)
    FROM inserted GROUP BY 1, 3, 4
    ON CONFLICT (user_id, date, hour) DO UPDATE SET
        microphone_ms = t.microphone_ms + EXCLUDED.microphone_ms,
        message_count = t.message_count + EXCLUDED.message_count
    """
)


def ledger_size() -> int:
    with db.engine().connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM usage_events")).scalar_one()


def grow_ledger(target: int, now: datetime) -> None:
    """Add past events (the last 30 days, hourly totals included) until the ledger holds `target` rows."""
    first = ledger_size() + 1
    step = 200_000
    for start in range(first, target + 1, step):
        with db.transaction() as conn:
            conn.execute(
                _PRELOAD_LEDGER,
                {"now": now, "languages": list(LANGUAGES), "first": start, "last": min(start + step - 1, target)},
            )
    with db.engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE usage_events, usage_tracking"))


# -- totals ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    ledger_events: int
    ledger_ms: int
    tracking_ms: int
    period_ms: int
    dead_letters: int

    def minus(self, before: Totals) -> Totals:
        return Totals(*(now - then for now, then in zip(vars(self).values(), vars(before).values(), strict=True)))


def totals() -> Totals:
    with db.engine().connect() as conn:
        row = conn.execute(
            sa.text(
                """
                SELECT (SELECT count(*) FROM usage_events), (SELECT COALESCE(sum(duration_ms), 0) FROM usage_events),
                       (SELECT COALESCE(sum(microphone_ms), 0) FROM usage_tracking),
                       (SELECT COALESCE(sum(used_ms), 0) FROM usage_periods), (SELECT count(*) FROM dead_letters)
                """
            )
        ).one()
    return Totals(*(int(value) for value in row))
