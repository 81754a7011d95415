"""The usage event: its validation, its times in integer milliseconds, and its exact split across UTC hours.

Pure: nothing here touches PostgreSQL or Redis. Every check is anchored to the whole string (`fullmatch`),
and every reason quotes the input with `repr`, which escapes what a text column cannot hold (NUL, lone
surrogates), so a reason can always be stored.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from uuid import UUID

from worker.config import settings
from worker.dead_letters import Rejected

MAX_BATCH_EVENTS = 1000
HOUR_MS = 3_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

FIELDS = ("event_id", "user_id", "started_at", "seconds", "language", "conversation_id", "feature")
FIELD_NAMES = frozenset(FIELDS)
REQUIRED = ("event_id", "user_id", "started_at", "seconds", "language")
RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})?")
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # as str(UUID) spells it
# The other spellings uuid.UUID reads (any case, braces, no hyphens, urn:uuid:), checked here in full:
# UUID() itself hands the digits to int(), which would also take spaces, a newline or underscores.
UUID_SPELLING = re.compile(
    r"(?:urn:uuid:)?(?P<brace>\{)?[0-9a-fA-F]{8}(?P<dash>-?)[0-9a-fA-F]{4}(?P=dash)[0-9a-fA-F]{4}(?P=dash)"
    r"[0-9a-fA-F]{4}(?P=dash)[0-9a-fA-F]{12}(?(brace)\})"
)
LANGUAGE = re.compile(r"[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")
FEATURE = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")
JSON_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:-]*")  # nothing JSON escapes


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


def _text(raw: dict[str, Any], name: str, limit: int) -> str:
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


def _uuid(raw: dict[str, Any], name: str) -> str:
    value = _text(raw, name, 64)
    if CANONICAL_UUID.fullmatch(value):
        return value  # already as str(UUID(value)) would spell it, and 3 µs cheaper
    if UUID_SPELLING.fullmatch(value) is None:
        raise Rejected(f"{name} is not a UUID like 0d8b7f6c-4f7e-4f43-9a39-8a0c8f0e1e21: {value[:64]!r}")
    return str(UUID(value))


def _started_ms(raw: dict[str, Any]) -> int:
    value = _text(raw, "started_at", 64)
    match = RFC3339.fullmatch(value)
    if match is None:
        raise Rejected(f"started_at is not an RFC 3339 time: {value!r}")
    base, fraction, offset = match.groups()
    if offset is None:
        raise Rejected(f"started_at has no UTC offset: {value!r} (add Z or +HH:MM)")
    try:
        moment = datetime.fromisoformat(f"{base}{'+00:00' if offset in 'Zz' else offset}")
    except ValueError as exc:
        raise Rejected(f"started_at is not a valid time: {value!r} ({exc})") from None
    # Finer than a millisecond is dropped (truncated): every total is kept in whole milliseconds. `moment`
    # holds whole seconds, so its float timestamp is exact (and a third of the cost of to_ms).
    return int(moment.timestamp()) * 1000 + (int(fraction[:3].ljust(3, "0")) if fraction else 0)


def _duration_ms(raw: dict[str, Any], max_seconds: int) -> int:
    value = raw["seconds"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"seconds must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Rejected(f"seconds must be a finite number, got {value}")
    if value <= 0:
        raise Rejected(f"seconds must be > 0, got {_short_number(value)}")
    if value > max_seconds:
        raise Rejected(f"seconds must be <= {max_seconds} (USAGE_MAX_EVENT_SECONDS), got {_short_number(value)}")
    ms = round(value * 1000)
    if isinstance(value, float) and abs(value * 1000 - ms) > 0.25:
        # Near a half millisecond the float product may fall on either side of it: round the exact decimal
        # (repr() of a float is its shortest exact decimal), half to even. Elsewhere the product is within
        # a few billionths of that decimal, so round() above gave the same integer without Decimal's cost.
        ms = int((Decimal(repr(value)) * 1000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    if ms == 0:
        raise Rejected(f"seconds must be at least 0.001 (one millisecond), got {value}")
    return ms


def _short_number(value: int | float) -> str:
    """A number for a reason; an integer too long to quote (Python refuses to print one of over 4300
    digits) is described by its size."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return repr(value)


def _unknown_fields(raw: dict[str, Any]) -> str:
    names = sorted(repr(name)[:66] for name in raw if name not in FIELD_NAMES)
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return f"unknown field(s): {shown}; fields are {', '.join(FIELDS)}"


@functools.lru_cache(maxsize=8)
def _accepted_starts(now: datetime) -> tuple[int, int]:
    """The latest and the earliest start accepted at `now`, in epoch ms (a batch validates all its events
    at one `now`)."""
    config, now_ms = settings(), to_ms(now)
    return now_ms + config.usage_max_future_seconds * 1000, now_ms - config.usage_max_lateness_days * 86_400_000


def parse_event(raw: Any, now: datetime) -> UsageEvent:
    """A validated event, or Rejected with a reason a person can act on."""
    if not isinstance(raw, dict):
        raise Rejected(f"event must be a JSON object, got {type(raw).__name__}")
    if not raw.keys() <= FIELD_NAMES:
        raise Rejected(_unknown_fields(raw))
    missing = [name for name in REQUIRED if raw.get(name) is None]
    if missing:
        raise Rejected(f"missing field(s): {', '.join(missing)}")
    config = settings()
    event_id = _text(raw, "event_id", 128)
    user_id = _uuid(raw, "user_id")
    started_ms = _started_ms(raw)
    duration_ms = _duration_ms(raw, config.usage_max_event_seconds)
    language = _text(raw, "language", 35)
    if LANGUAGE.fullmatch(language) is None:
        raise Rejected(f"language is not a language code like en, zh or pt-BR: {language!r}")
    conversation_id = _uuid(raw, "conversation_id") if raw.get("conversation_id") is not None else None
    feature = _text(raw, "feature", 64) if raw.get("feature") is not None else None
    if feature is not None and FEATURE.fullmatch(feature) is None:
        raise Rejected(f"feature must be a short lowercase name like conversation or pronunciation_check: {feature!r}")
    latest_ms, earliest_ms = _accepted_starts(now)
    if started_ms > latest_ms:
        raise Rejected(
            f"started_at is more than {config.usage_max_future_seconds} s in the future (USAGE_MAX_FUTURE_SECONDS)"
        )
    if started_ms < earliest_ms:
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


def _seconds(ms: int) -> int | float:
    return ms / 1000 if ms % 1000 else ms // 1000


def seconds_json(ms_by_key: dict[str, int]) -> str:
    if len(ms_by_key) == 1:  # an hour of one language, nearly always: no dict built for it
        ((key, ms),) = ms_by_key.items()
        return numbers_json({key: _seconds(ms)})
    return numbers_json({key: _seconds(ms) for key, ms in ms_by_key.items()})


def numbers_json(numbers: Mapping[str, int | float]) -> str:
    """A JSON object of numbers, keys sorted, as json.dumps writes it. Keys are language codes and
    feature names, which validation limits to characters JSON never escapes, so the object is written
    directly (a third of json.dumps's 2 µs, twice per usage_tracking row); any other key takes json.dumps."""
    if len(numbers) <= 1:  # most hours have one language and at most one feature
        for key, value in numbers.items():
            return f'{{"{key}": {value!r}}}' if JSON_PLAIN_KEY.fullmatch(key) else json.dumps({key: value})
        return "{}"
    if not all(JSON_PLAIN_KEY.fullmatch(key) for key in numbers):
        return json.dumps(dict(sorted(numbers.items())))
    return "{" + ", ".join(f'"{key}": {numbers[key]!r}' for key in sorted(numbers)) + "}"
