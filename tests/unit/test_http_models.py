"""The usage-event model documents what metering.parse_event accepts: events made from its schema pass
parse_event, and events that break one of its rules are refused by both."""

from __future__ import annotations

from datetime import UTC, datetime

import jsonschema_rs
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from worker import http_models, web
from worker.dead_letters import Rejected
from worker.metering import events

NOW = datetime(2031, 5, 10, 12, 0, tzinfo=UTC)
SCHEMA = schemathesis.openapi.from_dict(web.openapi())
EVENT_SCHEMA = jsonschema_rs.validator_for(web.DOCUMENT["components"]["schemas"]["UsageEvent"], validate_formats=True)
VALID = {"event_id": "e-1", "user_id": "9b2e1a53-95a0-4c57-9a5b-21a4bf1b7d33", "started_at": "2031-05-10T11:59:00Z",
         "seconds": 1.5, "language": "pt-BR", "conversation_id": None, "feature": "pronunciation_check"}  # fmt: skip


def events_of(body: object) -> list[dict]:
    return body["events"] if isinstance(body, dict) and "events" in body else [body]


def has_surrogate(event: dict) -> bool:  # not Unicode text: JSON Schema's strings cannot hold one
    return any(isinstance(value, str) and not value.isascii() and any(0xD800 <= ord(c) < 0xE000 for c in value)
               for value in event.values())  # fmt: skip


@given(case=SCHEMA["/v1/usage-events"]["POST"].as_strategy())
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_event_the_schema_allows_passes_parse_event(case: schemathesis.Case) -> None:
    for event in events_of(case.body):
        if has_surrogate(event):
            continue
        event = {**event, "started_at": NOW.isoformat()}  # the window around now is no schema's to say
        msgspec.convert(event, http_models.UsageEvent)
        parsed = events.parse_event(event, NOW)
        assert parsed.event_id == event["event_id"]


@pytest.mark.parametrize(
    "change",
    [
        {"event_id": ""},
        {"event_id": "x" * 129},
        {"event_id": "a\x00b"},
        {"user_id": "not-a-uuid"},
        {"started_at": "2031-05-10T11:59:00"},  # no offset
        {"started_at": "yesterday"},
        {"seconds": 0},
        {"seconds": 0.0005},  # rounds to 0 ms
        {"seconds": 14400.001},
        {"seconds": True},
        {"seconds": "1"},
        {"language": "english"},
        {"language": "e"},
        {"conversation_id": "nope"},
        {"feature": "Conversation"},
        {"feature": "x" * 65},
        {"mood": "happy"},
    ],
    ids=repr,
)
def test_an_event_breaking_a_rule_is_refused_by_the_model_and_by_parse_event(change: dict) -> None:
    event = {**VALID, **change}
    assert events.parse_event(VALID, NOW) and schema_allows(VALID)
    with pytest.raises(Rejected):
        events.parse_event(event, NOW)
    assert not schema_allows(event)


def schema_allows(event: dict) -> bool:
    """The model's types and bounds (msgspec), and the document's formats (uuid, date-time: a validator's)."""
    try:
        msgspec.convert(event, http_models.UsageEvent)
    except msgspec.ValidationError:
        return False
    return EVENT_SCHEMA.is_valid(event)
