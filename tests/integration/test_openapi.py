"""GET /openapi.json describes every route, and the app holds to it: a schemathesis run over the document,
against the app served over HTTP with the real PostgreSQL and Redis, finds no 5xx and no answer that
breaks its schema."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.factories import insert_user
from support.http_server import serve_in_thread

from worker import db, sessions
from worker.web import OPENAPI, ROUTES, app

pytestmark = pytest.mark.usefixtures("committed")

AUTH = {"Authorization": "Bearer test-token-1"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CASES = [  # data that breaks the document exists only where there is input: a body or a parameter
    (operation.method, operation.path, mode, "")
    for operation in [operation for operation, _ in ROUTES] + [OPENAPI]
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or operation.body or operation.parameters
] + [  # and once more with ids that exist, so that the calls get past the look-up
    ("POST", "/v1/usage-events", GenerationMode.POSITIVE, "known user"),
    ("GET", "/v1/quota/{user_id}", GenerationMode.POSITIVE, "known user"),
    ("POST", "/v1/sessions", GenerationMode.POSITIVE, "known user"),
    ("POST", "/v1/sessions/{session_id}/heartbeat", GenerationMode.POSITIVE, "open session"),
    ("POST", "/v1/sessions/{session_id}/heartbeat", GenerationMode.POSITIVE, "ended session"),
    ("POST", "/v1/sessions/{session_id}/end", GenerationMode.POSITIVE, "open session"),
]
CONTRACT_PATHS = {  # DESIGN.md's HTTP table
    "/healthz", "/readyz", "/metrics", "/v1/usage-events", "/v1/quota/{user_id}", "/v1/sessions",
    "/v1/sessions/{session_id}/heartbeat", "/v1/sessions/{session_id}/end", "/webhooks/stripe", "/openapi.json",
}  # fmt: skip
MAX_EXAMPLES = 25  # per operation and mode: about 20 s in all


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


def test_every_route_is_in_the_document_and_every_operation_is_a_route(base_url: str) -> None:
    document = httpx.get(f"{base_url}/openapi.json").json()
    assert document["openapi"] == "3.1.0"
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "One of INGEST_API_TOKENS."
    }  # fmt: skip
    served = {(route.path, method.lower()) for route in app.routes for method in route.methods if method != "HEAD"}
    documented = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert served == documented
    assert {path for path, _ in served} == CONTRACT_PATHS
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            secured = path.startswith("/v1/")
            assert ("security" in operation) == secured, (method, path)
            if secured:
                assert "401" in operation["responses"], (method, path)


@pytest.fixture(scope="module")
def served_schema(base_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


@dataclass(frozen=True)
class Known:
    user: str
    open_session: str
    ended_session: str


@pytest.fixture
def known() -> Known:
    with db.transaction() as conn:
        user = str(insert_user(conn))
    now = datetime.now(UTC)
    open_session, ended = (sessions.run(lambda conn: sessions.start(conn, user, "en", now)).session_id for _ in "ab")
    sessions.run(lambda conn: sessions.end(conn, ended, 0, now))
    return Known(user, open_session, ended)


def use_known_ids(case: schemathesis.Case, known: Known, which: str) -> None:
    """Point a generated case at the user and a session that exist; events start now."""
    parameters = case.path_parameters or {}
    session = known.ended_session if which == "ended session" else known.open_session
    for name, value in (("user_id", known.user), ("session_id", session)):
        if name in parameters:
            parameters[name] = value
    events = case.body.get("events", [case.body]) if isinstance(case.body, dict) else []
    for event in events:
        if isinstance(event, dict) and "user_id" in event:
            event["user_id"] = known.user
            if "started_at" in event:
                event["started_at"] = datetime.now(UTC).isoformat()


# schemathesis's pytest loader (`schemathesis.pytest.from_fixture`) reads `Function._nodeid`, which pytest 9
# no longer has; its documented Hypothesis strategies (`APIOperation.as_strategy`) do the same work here.
@pytest.mark.parametrize(("method", "path", "mode", "ids"), CASES, ids=[" ".join(case).strip() for case in CASES])
def test_the_app_holds_to_its_document(
    served_schema: schemathesis.BaseSchema, known: Known, method: str, path: str, mode: GenerationMode, ids: str
) -> None:
    operation = served_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def holds(case: schemathesis.Case) -> None:
        if ids:
            use_known_ids(case, known, ids)
        case.call_and_validate(headers=AUTH, checks=CHECKS)

    holds()
