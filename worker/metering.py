"""Metering: microphone-usage events into the ledger, hourly usage_tracking rows, period totals and limits.

A batch is one transaction of a few set-based statements, each over rows pre-aggregated in Python and
sorted by key, always in the same table order, so concurrent batches never deadlock:

    usage_events (ledger, drops duplicates) -> usage_hour_conversations -> usage_tracking
    -> usage_periods -> usage_alerts -> subscriptions

Only events the ledger accepted as new flow into the totals, so redelivered and duplicate events change
nothing. Time is the event's: usage is split exactly (integer milliseconds) across UTC hours and across
billing periods; late usage lands in the hour and the period it happened in.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db, periods, quota
from worker.config import settings
from worker.dead_letters import Letter, Rejected, record, replayer, storable_text
from worker.sqlarrays import array_literal, bare_array, time_array

MAX_BATCH_EVENTS = 1000
HOUR_MS = 3_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

FIELDS = ("event_id", "user_id", "started_at", "seconds", "language", "conversation_id", "feature")
FIELD_NAMES = frozenset(FIELDS)
REQUIRED = ("event_id", "user_id", "started_at", "seconds", "language")
RFC3339 = re.compile(r"^(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})?$")
CANONICAL_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")  # as str(UUID) writes it
LANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")
FEATURE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
JSON_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.:-]*$")  # nothing JSON escapes


@dataclass(frozen=True, slots=True)
class UsageEvent:
    event_id: str
    user_id: str
    started_ms: int  # milliseconds since the Unix epoch
    duration_ms: int
    language: str
    conversation_id: str | None = None
    feature: str | None = None

    @property
    def ended_ms(self) -> int:
        return self.started_ms + self.duration_ms

    @property
    def started_at(self) -> datetime:
        return to_datetime(self.started_ms)


def to_datetime(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def to_ms(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


# -- validation ------------------------------------------------------------------------------------------


def _text(raw: dict, name: str, limit: int) -> str:
    value = raw[name]
    if not isinstance(value, str):
        raise Rejected(f"{name} must be a string, got {type(value).__name__}")
    if not value:
        raise Rejected(f"{name} must not be empty")
    if len(value) > limit:
        raise Rejected(f"{name} is {len(value)} characters long; at most {limit} are allowed")
    if "\x00" in value:
        raise Rejected(f"{name} contains a NUL character")
    if not value.isascii():  # ASCII is valid UTF-8; only other text can hold an unpaired surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected(f"{name} is not valid UTF-8 (it holds an unpaired surrogate)") from None
    return value


def _uuid(raw: dict, name: str) -> str:
    value = _text(raw, name, 64)
    if CANONICAL_UUID.match(value):
        return value  # already spelt as str(UUID(value)) would spell it, and 3 µs cheaper
    try:
        return str(UUID(value))
    except ValueError:
        raise Rejected(f"{name} is not a UUID: {value[:64]!r}") from None


def _started_ms(raw: dict) -> int:
    value = _text(raw, "started_at", 64)
    match = RFC3339.match(value)
    if match is None:
        raise Rejected(f"started_at is not an RFC 3339 time: {value!r}")
    base, fraction, offset = match.groups()
    if offset is None:
        raise Rejected(f"started_at has no UTC offset: {value!r} (add Z or +HH:MM)")
    try:
        moment = datetime.fromisoformat(f"{base}{'+00:00' if offset in 'Zz' else offset}")
    except ValueError as exc:
        raise Rejected(f"started_at is not a valid time: {value!r} ({exc})") from None
    # Finer than a millisecond is dropped (truncated): every total is kept in whole milliseconds.
    return to_ms(moment) + int((fraction or "0").ljust(3, "0")[:3])


def _duration_ms(raw: dict, max_seconds: int) -> int:
    value = raw["seconds"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"seconds must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Rejected(f"seconds must be a finite number, got {value}")
    if value <= 0:
        raise Rejected(f"seconds must be > 0, got {value}")
    if value > max_seconds:
        raise Rejected(f"seconds must be <= {max_seconds} (USAGE_MAX_EVENT_SECONDS), got {value}")
    ms = round(value * 1000)
    if isinstance(value, float) and abs(value * 1000 - ms) > 0.25:
        # Near a half millisecond the float product may fall on either side of it: round the exact decimal
        # (repr() of a float is its shortest exact decimal), half to even. Elsewhere the product is within
        # a few billionths of that decimal, so round() above gave the same integer without Decimal's cost.
        ms = int((Decimal(repr(value)) * 1000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    if ms == 0:
        raise Rejected(f"seconds must be at least 0.001 (one millisecond), got {value}")
    return ms


def parse_event(raw: Any, now: datetime) -> UsageEvent:
    """A validated event, or Rejected with a reason a person can act on."""
    if not isinstance(raw, dict):
        raise Rejected(f"event must be a JSON object, got {type(raw).__name__}")
    if not raw.keys() <= FIELD_NAMES:
        unknown = sorted(str(name)[:64] for name in raw if name not in FIELD_NAMES)
        raise Rejected(f"unknown field(s): {', '.join(unknown)}")
    missing = [name for name in REQUIRED if raw.get(name) is None]
    if missing:
        raise Rejected(f"missing field(s): {', '.join(missing)}")
    config = settings()
    event_id = _text(raw, "event_id", 128)
    user_id = _uuid(raw, "user_id")
    started_ms = _started_ms(raw)
    duration_ms = _duration_ms(raw, config.usage_max_event_seconds)
    language = _text(raw, "language", 35)
    if not LANGUAGE.match(language):
        raise Rejected(f"language is not a language code like en, zh or pt-BR: {language!r}")
    conversation_id = _uuid(raw, "conversation_id") if raw.get("conversation_id") is not None else None
    feature = _text(raw, "feature", 64) if raw.get("feature") is not None else None
    if feature is not None and not FEATURE.match(feature):
        raise Rejected(f"feature must be a short lowercase name like conversation or pronunciation_check: {feature!r}")
    now_ms = to_ms(now)
    if started_ms > now_ms + config.usage_max_future_seconds * 1000:
        raise Rejected(
            f"started_at is more than {config.usage_max_future_seconds} s in the future (USAGE_MAX_FUTURE_SECONDS)"
        )
    if started_ms < now_ms - config.usage_max_lateness_days * 86_400_000:
        raise Rejected(
            f"started_at is more than {config.usage_max_lateness_days} days in the past (USAGE_MAX_LATENESS_DAYS)"
        )
    return UsageEvent(event_id, user_id, started_ms, duration_ms, language, conversation_id, feature)


# -- splitting -------------------------------------------------------------------------------------------


def hour_pieces(event: UsageEvent) -> Iterator[tuple[int, int]]:
    """(hour start in epoch ms, ms of the event inside that UTC hour) for each hour the event touches."""
    hour = event.started_ms - event.started_ms % HOUR_MS
    while hour < event.ended_ms:
        yield hour, min(event.ended_ms, hour + HOUR_MS) - max(event.started_ms, hour)
        hour += HOUR_MS


def overlap_ms(event: UsageEvent, start_ms: int, end_ms: int) -> int:
    return max(0, min(event.ended_ms, end_ms) - max(event.started_ms, start_ms))


@dataclass
class HourTotals:
    microphone_ms: int = 0
    message_count: int = 0
    conversations: set[str] = field(default_factory=set)
    language_ms: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    feature_counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def hourly_totals(events: Iterable[UsageEvent]) -> dict[tuple[str, int], HourTotals]:
    """Per (user, UTC hour start): exact milliseconds, events started, their conversations and features."""
    totals: dict[tuple[str, int], HourTotals] = defaultdict(HourTotals)
    for event in events:
        for hour, ms in hour_pieces(event):
            bucket = totals[event.user_id, hour]
            bucket.microphone_ms += ms
            bucket.language_ms[event.language] += ms
        first = totals[event.user_id, event.started_ms - event.started_ms % HOUR_MS]
        first.message_count += 1
        if event.conversation_id:
            first.conversations.add(event.conversation_id)
        if event.feature:
            first.feature_counts[event.feature] += 1
    return totals


def seconds_json(ms_by_key: dict[str, int]) -> str:
    return numbers_json({key: ms / 1000 if ms % 1000 else ms // 1000 for key, ms in ms_by_key.items()})


def numbers_json(numbers: dict[str, int | float]) -> str:
    """A JSON object of numbers, keys sorted, as json.dumps writes it. Keys are language codes and
    feature names, which validation limits to characters JSON never escapes, so the object is written
    directly (a third of json.dumps's 2 µs, twice per usage_tracking row); any other key takes json.dumps."""
    if not all(map(JSON_PLAIN_KEY.match, numbers)):
        return json.dumps(dict(sorted(numbers.items())))
    return "{" + ", ".join(f'"{key}": {numbers[key]!r}' for key in sorted(numbers)) + "}"


# -- applying a batch ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    index: int
    event_id: str | None
    reason: str

    def as_dict(self) -> dict:
        return {"index": self.index, "event_id": self.event_id, "reason": self.reason}


@dataclass
class Outcome:
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    quotas: dict[str, quota.Quota] = field(default_factory=dict)


def known_users(conn: Connection, user_ids: Iterable[str]) -> set[str]:
    rows = conn.execute(
        sa.text("SELECT id::text FROM profiles WHERE id = ANY(CAST(:ids AS uuid[]))"),
        {"ids": bare_array(sorted(set(user_ids)))},
    )
    return set(rows.scalars())


_INSERT_LEDGER = sa.text(
    """
    INSERT INTO usage_events (event_id, user_id, started_at, duration_ms, language, conversation_id, feature,
                              received_at)
    SELECT e.event_id, e.user_id, e.started_at, e.duration_ms, e.language, e.conversation_id, e.feature, :now
    FROM unnest(CAST(:event_ids AS text[]), CAST(:user_ids AS uuid[]), CAST(:started AS timestamptz[]),
                CAST(:durations AS bigint[]), CAST(:languages AS text[]), CAST(:conversations AS uuid[]),
                CAST(:features AS text[]))
         AS e(event_id, user_id, started_at, duration_ms, language, conversation_id, feature)
    ORDER BY e.event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
    """
)


def _insert_ledger(conn: Connection, events: list[UsageEvent], now: datetime) -> set[str]:
    """Insert into the ledger; returns the ids that were new (the rest were recorded before)."""
    rows = conn.execute(
        _INSERT_LEDGER,
        {
            "now": now,
            "event_ids": array_literal(e.event_id for e in events),
            "user_ids": bare_array([e.user_id for e in events]),
            "started": time_array(e.started_at for e in events),
            "durations": bare_array([e.duration_ms for e in events]),
            "languages": array_literal(e.language for e in events),
            "conversations": array_literal(e.conversation_id for e in events),
            "features": array_literal(e.feature for e in events),
        },
    )
    return set(rows.scalars())


_NEW_HOUR_CONVERSATIONS = sa.text(
    """
    INSERT INTO usage_hour_conversations (user_id, hour_start, conversation_id)
    SELECT * FROM unnest(CAST(:user_ids AS uuid[]), CAST(:hours AS timestamptz[]), CAST(:conversations AS uuid[]))
    ORDER BY 1, 2, 3
    ON CONFLICT DO NOTHING
    RETURNING user_id::text, hour_start
    """
)


def _new_conversation_counts(conn: Connection, totals: dict[tuple[str, int], HourTotals]) -> dict[tuple[str, int], int]:
    """Per (user, hour): conversations seen in that hour for the first time, by this batch or any before."""
    keys = sorted((user, hour, conversation) for (user, hour), t in totals.items() for conversation in t.conversations)
    counts: dict[tuple[str, int], int] = defaultdict(int)
    if not keys:
        return counts
    rows = conn.execute(
        _NEW_HOUR_CONVERSATIONS,
        {
            "user_ids": bare_array([k[0] for k in keys]),
            "hours": time_array(to_datetime(k[1]) for k in keys),
            "conversations": bare_array([k[2] for k in keys]),
        },
    )
    for user_id, hour_start in rows:
        counts[user_id, to_ms(hour_start)] += 1
    return counts


_TRACKING_ROWS = """
    INSERT INTO usage_tracking AS t (user_id, tracked_at, date, hour, microphone_ms, microphone_seconds,
                                     message_count, conversation_count, language_breakdown, feature_usage,
                                     is_aggregated)
    SELECT r.user_id, :now, (r.hour_start AT TIME ZONE 'UTC')::date,
           EXTRACT(HOUR FROM r.hour_start AT TIME ZONE 'UTC')::int,
           r.ms, r.ms / 1000, r.messages, r.conversations, r.languages, r.features, false
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:hours AS timestamptz[]), CAST(:ms AS bigint[]),
                CAST(:messages AS int[]), CAST(:conversations AS int[]), CAST(:languages AS jsonb[]),
                CAST(:features AS jsonb[]))
         AS r(user_id, hour_start, ms, messages, conversations, languages, features)
    ORDER BY r.user_id, r.hour_start
    ON CONFLICT (user_id, date, hour) DO UPDATE SET
        tracked_at = EXCLUDED.tracked_at,
        is_aggregated = false,  -- the aggregation looks at the row again (it rolls up only what is new)
"""


def _sum_merged(column: str) -> str:
    """SQL for the row's JSON map `column` with the new row's numbers added key by key: what
    jsonb_sum_merge(t.column, EXCLUDED.column) answers, computed inline. Calling that function once per
    row and column took 40 % of the statement (a function with its own search_path cannot be inlined
    and sets the path at every call); this walks only the new row's keys (one or two)."""
    return f"""
        CASE WHEN jsonb_typeof(t.{column}) = 'object' THEN t.{column} ELSE '{{}}' END
        || COALESCE((SELECT jsonb_object_agg(e.key, COALESCE((t.{column} ->> e.key)::numeric, 0) + e.value::numeric)
                     FROM jsonb_each_text(EXCLUDED.{column}) AS e), '{{}}')"""


_ADD_TO_TRACKING = sa.text(
    _TRACKING_ROWS
    + f"""
        microphone_ms = t.microphone_ms + EXCLUDED.microphone_ms,
        microphone_seconds = (t.microphone_ms + EXCLUDED.microphone_ms) / 1000,
        message_count = COALESCE(t.message_count, 0) + EXCLUDED.message_count,
        conversation_count = COALESCE(t.conversation_count, 0) + EXCLUDED.conversation_count,
        language_breakdown = {_sum_merged("language_breakdown")},
        feature_usage = {_sum_merged("feature_usage")}
    """
)
# Sets rather than adds: a rebuild from the ledger writes whole recomputed hours.
_REPLACE_TRACKING = sa.text(
    _TRACKING_ROWS
    + """
        microphone_ms = EXCLUDED.microphone_ms,
        microphone_seconds = EXCLUDED.microphone_seconds,
        message_count = EXCLUDED.message_count,
        conversation_count = EXCLUDED.conversation_count,
        language_breakdown = EXCLUDED.language_breakdown,
        feature_usage = EXCLUDED.feature_usage
    """
)


def write_tracking(
    conn: Connection,
    totals: dict[tuple[str, int], HourTotals],
    conversation_counts: dict[tuple[str, int], int],
    now: datetime,
    replace: bool = False,
) -> None:
    """Add (or, with `replace`, set) hourly totals in usage_tracking, one statement in key order."""
    rows = _tracking_rows(totals, now)
    _write_tracking_rows(conn, rows, conversation_counts, replace)


@dataclass
class TrackingRows:
    """The usage_tracking statement's arrays, all but the conversation counts (known only once the
    conversations are inserted), in key order."""

    keys: list[tuple[str, int]]
    params: dict[str, Any]


def _tracking_rows(totals: dict[tuple[str, int], HourTotals], now: datetime) -> TrackingRows:
    keys = sorted(totals)
    return TrackingRows(
        keys,
        {
            "now": now,
            "user_ids": bare_array([user for user, _ in keys]),
            "hours": time_array(to_datetime(hour) for _, hour in keys),
            "ms": bare_array([totals[k].microphone_ms for k in keys]),
            "messages": bare_array([totals[k].message_count for k in keys]),
            "languages": array_literal(seconds_json(totals[k].language_ms) for k in keys),
            "features": array_literal(numbers_json(totals[k].feature_counts) for k in keys),
        },
    )


def _write_tracking_rows(
    conn: Connection, rows: TrackingRows, conversation_counts: dict[tuple[str, int], int], replace: bool = False
) -> None:
    conversations = bare_array([conversation_counts.get(k, 0) for k in rows.keys])
    conn.execute(_REPLACE_TRACKING if replace else _ADD_TO_TRACKING, {**rows.params, "conversations": conversations})


_ADD_TO_PERIODS = sa.text(
    """
    WITH locked AS (
        SELECT id FROM usage_periods WHERE id = ANY(CAST(:ids AS bigint[])) ORDER BY id FOR UPDATE
    )
    UPDATE usage_periods u SET used_ms = u.used_ms + d.ms
    FROM unnest(CAST(:ids AS bigint[]), CAST(:ms AS bigint[])) AS d(id, ms)
    WHERE u.id = d.id AND u.id IN (SELECT id FROM locked)
    RETURNING u.id, u.user_id::text AS user_id, u.period_start, u.period_end, u.used_ms - d.ms AS used_before,
              u.used_ms, u.limit_ms
    """
)

_RAISE_ALERTS = sa.text(
    """
    INSERT INTO usage_alerts (user_id, period_start, threshold_percent, used_ms, limit_ms, triggered_at)
    SELECT * , :now FROM unnest(CAST(:user_ids AS uuid[]), CAST(:starts AS timestamptz[]),
                                CAST(:thresholds AS smallint[]), CAST(:used AS bigint[]), CAST(:limits AS bigint[]))
    ORDER BY 1, 2, 3
    ON CONFLICT (user_id, period_start, threshold_percent) DO NOTHING
    """
)

_MARK_SUBSCRIPTIONS = sa.text(
    """
    UPDATE subscriptions s
    SET monthly_minutes_used = d.used_ms / 60000,
        limit_reached_at = CASE WHEN d.used_ms >= d.limit_ms THEN COALESCE(s.limit_reached_at, :now)
                                ELSE s.limit_reached_at END
    FROM unnest(CAST(:user_ids AS uuid[]), CAST(:starts AS timestamptz[]), CAST(:used AS bigint[]),
                CAST(:limits AS bigint[])) AS d(user_id, period_start, used_ms, limit_ms)
    WHERE s.user_id = d.user_id AND s.current_period_start = d.period_start
      AND (s.monthly_minutes_used IS DISTINCT FROM d.used_ms / 60000
           OR (d.used_ms >= d.limit_ms AND s.limit_reached_at IS NULL))
    """
)

ALERT_THRESHOLDS = (80, 100)  # percent of the period's limit


@dataclass
class PeriodUsage:
    """What a batch adds to each period row (by id), and the users whose periods do not exist yet."""

    added: dict[int, int]
    missing: dict[str, periods.Span]
    read: dict[int, periods.Period]  # the periods as read, to check they did not move before they were locked


def _period_usage(conn: Connection, events: list[UsageEvent]) -> PeriodUsage:
    """Read the periods the events fall in (no lock) and split the usage between them; users whose
    periods do not cover their usage yet are left to `_add_to_periods`, which creates the periods."""
    spans = periods.spans_of((e.user_id, e.started_at, to_datetime(e.ended_ms)) for e in events)
    by_user = periods.periods_overlapping(conn, spans)
    missing = periods.uncovered(spans, by_user)
    added = _split_by_period([e for e in events if e.user_id not in missing], by_user)
    return PeriodUsage(added, missing, _by_id(by_user))


def _by_id(by_user: dict[str, list[periods.Period]]) -> dict[int, periods.Period]:
    return {period.id: period for found in by_user.values() for period in found}


def _split_by_period(events: list[UsageEvent], by_user: dict[str, list[periods.Period]]) -> dict[int, int]:
    bounds = {period.id: (to_ms(period.start), to_ms(period.end)) for found in by_user.values() for period in found}
    added: dict[int, int] = defaultdict(int)
    for event in events:
        for period in by_user.get(event.user_id, ()):
            ms = overlap_ms(event, *bounds[period.id])
            if ms:
                added[period.id] += ms
    return added


def raise_alerts(conn: Connection, periods_used: Sequence[Any], now: datetime) -> None:
    """The 80 % and 100 % alerts of the periods whose usage crossed them: rows with user_id,
    period_start, used_before, used_ms and limit_ms. An alert already raised stays as it is."""
    crossed = sorted(
        (row.user_id, row.period_start, threshold, row.used_ms, row.limit_ms)
        for row in periods_used
        for threshold in ALERT_THRESHOLDS
        if row.used_ms * 100 >= row.limit_ms * threshold > row.used_before * 100
    )
    if crossed:
        columns = [array_literal(column) for column in zip(*crossed, strict=True)]
        conn.execute(
            _RAISE_ALERTS,
            {"now": now, "user_ids": columns[0], "starts": columns[1], "thresholds": columns[2],
             "used": columns[3], "limits": columns[4]},
        )  # fmt: skip


def _add_to_periods(conn: Connection, usage: PeriodUsage, events: list[UsageEvent], now: datetime) -> None:
    added, read = usage.added, usage.read
    if usage.missing:  # a user's first usage, or usage beyond the periods known so far: four more statements
        periods.ensure_periods(conn, usage.missing, now)
        by_user = periods.periods_overlapping(conn, usage.missing)
        added = {**added, **_split_by_period([e for e in events if e.user_id in usage.missing], by_user)}
        read = {**read, **_by_id(by_user)}
    ids = sorted(added)
    rows = conn.execute(_ADD_TO_PERIODS, {"ids": bare_array(ids), "ms": bare_array([added[i] for i in ids])}).all()
    moved = len(rows) != len(ids) or any(
        (row.period_start, row.period_end) != (read[row.id].start, read[row.id].end) for row in rows
    )
    if moved:  # a Stripe period change committed between the split and the lock: split again
        raise db.StaleRead("a period of this batch's users moved while the batch was being applied")
    raise_alerts(conn, rows, now)
    rows.sort(key=lambda row: row.user_id)
    conn.execute(
        _MARK_SUBSCRIPTIONS,
        {
            "now": now,
            "user_ids": bare_array([row.user_id for row in rows]),
            "starts": time_array(row.period_start for row in rows),
            "used": bare_array([row.used_ms for row in rows]),
            "limits": bare_array([row.limit_ms for row in rows]),
        },
    )


@dataclass
class Screened:
    """A batch sorted before any write: applicable events (with their index), duplicates within the
    batch, and rejections (in batch order)."""

    events: list[tuple[int, UsageEvent]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def screen(conn: Connection, raw_events: Sequence[Any], now: datetime) -> Screened:
    """Validate every event, keep the first of each id, and reject events of unknown users."""
    screened = Screened()
    valid: list[tuple[int, UsageEvent]] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_events):
        try:
            event = parse_event(raw, now)
        except Rejected as exc:
            event_id = storable_text(raw.get("event_id")) if isinstance(raw, dict) else None
            screened.rejected.append(Rejection(index, event_id, exc.reason))
            continue
        if event.event_id in seen:
            screened.duplicates.append(event.event_id)
            continue
        seen.add(event.event_id)
        valid.append((index, event))
    known = known_users(conn, (event.user_id for _, event in valid))
    for index, event in valid:
        if event.user_id in known:
            screened.events.append((index, event))
        else:
            screened.rejected.append(Rejection(index, event.event_id, f"unknown user_id {event.user_id}"))
    screened.rejected.sort(key=lambda rejection: rejection.index)
    return screened


def apply_events(
    conn: Connection, raw_events: Sequence[Any], now: datetime, task_name: str | None = None, dead_letter: bool = True
) -> Outcome:
    """Validate and apply a batch in the caller's transaction; bad events are dead-lettered in it too.

    The caller publishes `outcome.quotas` (quota.publish) once the transaction has committed.
    """
    screened = screen(conn, raw_events, now)
    outcome = Outcome(duplicates=screened.duplicates, rejected=screened.rejected)
    events = [event for _, event in screened.events]
    new_ids = _insert_ledger(conn, events, now) if events else set()
    new_events = [event for event in events if event.event_id in new_ids]
    outcome.accepted = [event.event_id for event in new_events]
    outcome.duplicates += [event.event_id for event in events if event.event_id not in new_ids]
    if new_events:
        # All that takes no row lock comes first: batches that share users wait for each other from the
        # first row one locks (the conversations, then usage_tracking) until its commit, so that stretch
        # holds only the writes themselves.
        totals = hourly_totals(new_events)
        tracking = _tracking_rows(totals, now)
        usage = _period_usage(conn, new_events)
        _write_tracking_rows(conn, tracking, _new_conversation_counts(conn, totals))
        _add_to_periods(conn, usage, new_events, now)
        outcome.quotas = quota.read(conn, {event.user_id for event in new_events}, now)
    if dead_letter:
        record(
            conn,
            (Letter("usage", raw_events[r.index], r.reason, r.event_id, task_name) for r in outcome.rejected),
            now,
        )
    return outcome


@replayer("usage")
def replay_event(conn: Connection, payload: Any, now: datetime) -> Callable[[], None]:
    outcome = apply_events(conn, [payload], now, dead_letter=False)
    if outcome.rejected:
        raise Rejected(outcome.rejected[0].reason)
    return lambda: quota.publish(outcome.quotas.values())
