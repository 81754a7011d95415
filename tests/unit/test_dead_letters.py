"""What a dead letter keeps of an input PostgreSQL could not hold as it is (worker.dead_letters.storable)."""

from __future__ import annotations

import json

import pytest

from worker.dead_letters import MAX_PAYLOAD_CHARS, MAX_PAYLOAD_DEPTH, escaped_text, storable, storable_text


def nested(depth: int) -> object:
    value: object = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def holdable(value: object) -> bool:
    """What jsonb accepts: JSON text that is valid UTF-8 and holds no NUL."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")
    return "\\u0000" not in text


@pytest.mark.parametrize(
    "payload",
    [{"event_id": "e1", "seconds": 2.5}, ["a", 1, None, True], "plain", 12, None, nested(MAX_PAYLOAD_DEPTH)],
)
def test_what_jsonb_can_hold_is_kept_as_it_is(payload: object) -> None:
    assert storable(payload) is payload


def test_nul_and_lone_surrogates_are_kept_as_escapes_keys_included() -> None:
    payload = {"language": "en\x00", "event_id": "bad-\udc80", "key\x00": ["\ud800"]}
    kept = storable(payload)
    assert kept == {"language": "en\\x00", "event_id": "bad-\\udc80", "key\\x00": ["\\ud800"]}
    assert holdable(kept)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (nested(MAX_PAYLOAD_DEPTH + 5), "nested deeper than"),
        (nested(5000), "nested deeper than"),  # deeper than Python's own recursion limit
        ({"seconds": float("nan")}, "not JSON"),
        ({"seconds": 10**5000}, "not JSON"),  # an integer Python refuses to print
        ({"blob": "x" * (MAX_PAYLOAD_CHARS + 1)}, "larger than"),
    ],
)
def test_what_cannot_be_held_is_described_with_an_excerpt(payload: object, why: str) -> None:
    kept = storable(payload)
    assert why in kept["unstorable"]
    assert isinstance(kept["excerpt"], str) and len(kept["excerpt"]) <= 4000
    assert holdable(kept)


def test_a_value_json_has_no_type_for_is_kept_as_its_repr() -> None:
    kept = storable({"when": object(), "tag": "ok"})
    assert kept["tag"] == "ok" and kept["when"].startswith("<object object at")
    assert holdable(kept)


def test_texts_for_columns_are_escaped_or_dropped() -> None:
    assert escaped_text("fine") == "fine"
    assert escaped_text("a\x00b\ud800") == "a\\x00b\\ud800"
    assert storable_text("id-1") == "id-1"
    assert storable_text("a\x00b") is None and storable_text("\udc80") is None and storable_text(7) is None
    assert storable_text("x" * 500) == "x" * 200
