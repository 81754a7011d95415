"""Every field of a usage event is checked, with a reason a person can act on."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from worker.dead_letters import Rejected
from worker.metering.events import UsageEvent, hour_pieces, parse_event, to_ms

NOW = datetime(2027, 3, 10, 12, 0, tzinfo=UTC)
USER = "8a0c8f0e-4f7e-4f43-9a39-0d8b7f6c1e21"


def good(**overrides: object) -> dict:
    event = {
        "event_id": "evt-1",
        "user_id": USER,
        "started_at": "2027-03-10T11:59:00Z",
        "seconds": 12.5,
        "language": "en",
    }
    event.update(overrides)
    return event


BAD_EVENTS = [
    ("not an object", ["evt"], "event must be a JSON object, got list"),
    ("null", None, "event must be a JSON object, got NoneType"),
    ("missing event_id", {k: v for k, v in good().items() if k != "event_id"}, "missing field(s): event_id"),
    ("missing several", {"event_id": "x"}, "missing field(s): user_id, started_at, seconds, language"),
    ("extra field", good(minutes=3), "unknown field(s): 'minutes'; fields are event_id, user_id"),
    ("empty event_id", good(event_id=""), "event_id must not be empty"),
    ("long event_id", good(event_id="e" * 129), "event_id is 129 characters long; at most 128"),
    ("numeric event_id", good(event_id=17), "event_id must be a string, got int"),
    ("NUL in event_id", good(event_id="a\x00b"), "event_id contains a NUL character"),
    ("lone surrogate", good(event_id="bad\udc80"), "event_id is not valid UTF-8"),
    ("1 MB language", good(language="e" * 1_000_000), "language is 1000000 characters long"),
    ("malformed user_id", good(user_id="not-a-uuid"), "user_id is not a UUID"),
    ("user_id number", good(user_id=42), "user_id must be a string, got int"),
    ("malformed conversation_id", good(conversation_id="c-1"), "conversation_id is not a UUID"),
    ("no offset", good(started_at="2027-03-10T11:59:00"), "started_at has no UTC offset"),
    ("not a time", good(started_at="yesterday"), "started_at is not an RFC 3339 time"),
    ("impossible date", good(started_at="2027-02-30T10:00:00Z"), "started_at is not a valid time"),
    ("epoch number", good(started_at=1700000000), "started_at must be a string, got int"),
    ("too far in the future", good(started_at="2027-03-10T12:05:01Z"), "more than 300 s in the future"),
    ("too late", good(started_at="2027-02-03T11:59:59Z"), "more than 35 days in the past"),
    ("zero seconds", good(seconds=0), "seconds must be > 0, got 0"),
    ("negative seconds", good(seconds=-3), "seconds must be > 0, got -3"),
    ("NaN", good(seconds=math.nan), "seconds must be a finite number, got nan"),
    ("infinity", good(seconds=math.inf), "seconds must be a finite number, got inf"),
    ("string seconds", good(seconds="60"), "seconds must be a number, got str"),
    ("boolean seconds", good(seconds=True), "seconds must be a number, got bool"),
    ("too long", good(seconds=14400.001), "seconds must be <= 14400"),
    ("below a millisecond", good(seconds=0.0004), "seconds must be at least 0.001"),
    ("bad language", good(language="English"), "language is not a language code"),
    ("bad feature", good(feature="Pronunciation Check"), "feature must be a short lowercase name"),
]


@pytest.mark.parametrize(("raw", "reason"), [case[1:] for case in BAD_EVENTS], ids=[case[0] for case in BAD_EVENTS])
def test_bad_events_are_rejected_with_a_reason(raw: object, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        parse_event(raw, NOW)
    assert reason in caught.value.reason


def test_a_good_event_is_parsed_to_whole_milliseconds() -> None:
    event = parse_event(good(seconds=0.1, started_at="2027-03-10T17:29:00.123456+05:30", feature="conversation"), NOW)
    assert event.duration_ms == 100
    assert event.started_at == datetime(2027, 3, 10, 11, 59, 0, 123000, tzinfo=UTC)
    assert event.feature == "conversation"
    assert parse_event(good(seconds=14400), NOW).duration_ms == 14_400_000
    assert parse_event(good(user_id=USER.upper()), NOW).user_id == USER
    assert parse_event(good(started_at="2027-03-10t11:59:00z"), NOW).started_ms == to_ms(
        datetime(2027, 3, 10, 11, 59, tzinfo=UTC)
    )


def test_an_event_is_split_exactly_across_hours() -> None:
    start = to_ms(datetime(2027, 3, 10, 10, 59, 59, 500000, tzinfo=UTC))
    event = UsageEvent("e", USER, start, 3_601_000, "en")
    pieces = list(hour_pieces(event))
    assert [ms for _, ms in pieces] == [500, 3_600_000, 500]
    assert sum(ms for _, ms in pieces) == event.duration_ms
