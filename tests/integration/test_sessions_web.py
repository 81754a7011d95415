"""The live-session routes over real HTTP: the answers of a session's life, and each refusal."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from support.factories import insert_user
from support.http_server import serve_in_thread

from worker import db
from worker.web import app

pytestmark = pytest.mark.usefixtures("committed")

AUTH = {"Authorization": "Bearer test-token-1"}


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=15, headers=AUTH) as http:
        yield http


def make_user() -> str:
    with db.transaction() as conn:
        return str(insert_user(conn))


def test_a_session_over_http_from_start_to_end(client: httpx.Client) -> None:
    user = make_user()
    started = client.post("/v1/sessions", json={"user_id": user, "language": "en", "feature": "conversation"})
    assert started.status_code == 201
    body = started.json()
    session = body.pop("session_id")
    expires = datetime.fromisoformat(body.pop("expires_at"))
    assert 115 < (expires - datetime.now(UTC)).total_seconds() <= 120
    assert body == {"granted_seconds": 60, "remaining_seconds": 3540, "blocked": False, "used_seconds": 0,
                    "beyond_grant_seconds": 0}  # fmt: skip

    beat = client.post(f"/v1/sessions/{session}/heartbeat", json={"used_seconds": 1.25})
    assert beat.status_code == 200
    assert {key: beat.json()[key] for key in ("granted_seconds", "used_seconds", "remaining_seconds")} == {
        "granted_seconds": 60, "used_seconds": 1.25, "remaining_seconds": 3538.75,
    }  # fmt: skip
    quota = client.get(f"/v1/quota/{user}").json()
    assert (quota["used_seconds"], quota["reserved_seconds"], quota["remaining_seconds"]) == (1.25, 60, 3538.75)

    ended = client.post(f"/v1/sessions/{session}/end", json={"used_seconds": 2})
    assert ended.status_code == 200
    assert {key: value for key, value in ended.json().items() if key != "ended_at"} == {
        "session_id": session, "state": "ended", "recorded_seconds": 2, "beyond_grant_seconds": 0,
    }  # fmt: skip
    assert client.post(f"/v1/sessions/{session}/end", json={"used_seconds": 2}).json() == ended.json()
    late = client.post(f"/v1/sessions/{session}/heartbeat", json={"used_seconds": 3})
    assert late.status_code == 409
    assert late.json() == {
        "error": f"session {session} is ended: nothing was recorded; send its total to "
                 f"/v1/sessions/{session}/end and start a new session",
        "session": ended.json(),
    }  # fmt: skip


def test_refusals_say_why(client: httpx.Client) -> None:
    unknown_user, unknown_session = uuid.uuid4(), uuid.uuid4()
    cases = [
        (client.post("/v1/sessions", json={"user_id": str(unknown_user), "language": "en"}),
         404, f"no user with id {unknown_user}"),
        (client.post("/v1/sessions", json={"user_id": "nope", "language": "en"}),
         400, "user_id is not a UUID like 0d8b7f6c-4f7e-4f43-9a39-8a0c8f0e1e21: 'nope'"),
        (client.post("/v1/sessions", content=b"{"), 400, "malformed body: Input data was truncated"),
        (client.post("/v1/sessions", json={"user_id": str(unknown_user)}),
         400, "malformed body: Object missing required field `language`"),
        (client.post(f"/v1/sessions/{unknown_session}/heartbeat", json={"used_seconds": 1}),
         404, f"no session with id {unknown_session}"),
        (client.post("/v1/sessions/not-one/end", json={"used_seconds": 1}), 400, "session_id is not a UUID: 'not-one'"),
        (client.post(f"/v1/sessions/{unknown_session}/end", json={"used_seconds": -1}),
         400, "malformed body: Expected `float` >= 0.0 - at `$.used_seconds`"),
        (client.post("/v1/sessions", json={"user_id": "x", "language": "en"}, headers={"Authorization": ""}),
         401, "missing bearer token (Authorization: Bearer <token>)"),
        (client.post("/v1/sessions", content=b" " * 5000), 413, "body is larger than 4096 bytes"),
    ]  # fmt: skip
    for response, status, reason in cases:
        assert (response.status_code, response.json()["error"]) == (status, reason)
