"""The shapes of a `POST /v1/usage-events` body (worker.ingest.events_of): each wrong one a reason."""

from __future__ import annotations

import pytest

from worker.ingest import BadRequest, events_of


def test_one_event_or_a_list_of_events() -> None:
    assert events_of(b'{"event_id": "a"}') == [{"event_id": "a"}]
    assert events_of(b'{"events": [{"event_id": "a"}, 3]}') == [{"event_id": "a"}, 3]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "body is not JSON"),
        (b"{", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "body is not JSON"),  # deeper than the decoder recurses
        (b"[1, 2]", "body must be a JSON object"),
        (b'"text"', "body must be a JSON object"),
        (b'{"events": []}', "events must be a list of 1 to 1000"),
        (b'{"events": {}}', "events must be a list of 1 to 1000"),
        (b'{"events": [' + b"{}," * 1000 + b"{}]}", "events must be a list of 1 to 1000"),
        (b'{"events": [{}], "user_id": "x"}', "has no other keys; got 'user_id'"),
        (b'{"events": [{}], "\\u0000": 1}', "has no other keys; got '\\x00'"),
    ],
)
def test_a_body_of_another_shape_is_refused_with_its_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest) as refused:
        events_of(body)
    assert reason in refused.value.reason
    refused.value.reason.encode("utf-8")  # the reason can always be sent back
