"""The `web` process: Stripe's webhook receiver, the ingest, quota and live-session API, health, metrics and
the OpenAPI document of them all (built from the models its answers are made of: worker/http_models.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

import kombu.exceptions
import msgspec
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from worker import db, health, ingest, quota, sessions
from worker import http_models as models
from worker.clock import utcnow
from worker.config import settings
from worker.logs import configure_logging, get_logger
from worker.stripe import webhook

log = get_logger(__name__)

Body = TypeVar("Body", bound=msgspec.Struct)
SESSION_BODY_BYTES = 4096  # a session's start or report is a few dozen bytes


def _answer(model: msgspec.Struct, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(models.encode(model), status_code=status, headers=headers, media_type="application/json")


async def healthz(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def readyz(_request: Request) -> Response:
    down = await health.unavailable()
    if down:
        log.warning("not_ready", down=down)
        return _answer(models.Readiness("unavailable", down), 503)
    return _answer(models.Readiness("ready"))


# -- ingest and quota API ----------------------------------------------------------------------------------


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return _answer(models.Error(reason), status, headers)


def _token_matches(presented: str, tokens: tuple[str, ...]) -> bool:
    """Constant time: every token is compared, so timing tells neither which token matched nor how early."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented.encode(), token.encode())
    return matched


def _authorize(request: Request) -> Response | None:
    """None when the request carries a configured bearer token, else the answer to send."""
    tokens = settings().ingest_api_tokens
    if not tokens:
        return _error(503, "INGEST_API_TOKENS is empty: the usage and quota routes are closed until it names a token")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return _error(401, "missing bearer token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"})
    if not _token_matches(presented.strip(), tokens):
        log.warning("unauthorized", path=request.url.path, client=request.client.host if request.client else None)
        return _error(401, "invalid bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return None


class BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():  # a missing or false Content-Length is caught here
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def _unavailable(exc: Exception, route: str) -> Response:
    """503 when Redis or PostgreSQL is down (the caller retries the whole request safely); other errors raise."""
    if isinstance(exc, (kombu.exceptions.OperationalError, redis.RedisError, sessions.ReservationLost)):
        down = "Redis"
    elif db.is_transient(exc):
        down = "PostgreSQL"
    else:
        raise exc
    log.warning("dependency_unavailable", route=route, down=down, error=health.first_line(exc))
    return _error(503, f"{down} is unavailable; retry later", {"Retry-After": "5"})


async def ingest_usage(request: Request) -> Response:
    denied = _authorize(request)
    if denied is not None:
        return denied
    try:
        body = await _read_body(request, ingest.MAX_BODY_BYTES)
    except BodyTooLarge:
        return _error(413, f"body is larger than {ingest.MAX_BODY_BYTES} bytes; send at most 1000 events per request")
    try:
        raw_events = ingest.events_of(body)
    except ingest.BadRequest as exc:
        return _error(400, exc.reason)
    try:
        outcome = await asyncio.to_thread(ingest.ingest, raw_events)
    except Exception as exc:
        return _unavailable(exc, ingest.ROUTE)
    rejected = [models.Rejection(r.index, r.event_id, r.reason) for r in outcome.rejected]
    return _answer(models.IngestAnswer(outcome.accepted, outcome.duplicates, rejected), 202)


async def get_quota(request: Request) -> Response:
    denied = _authorize(request)
    if denied is not None:
        return denied
    raw_user_id = request.path_params["user_id"]
    try:
        user_id = UUID(raw_user_id)
    except ValueError:
        return _error(400, f"user_id is not a UUID: {raw_user_id[:64]!r}")
    try:
        answer = await asyncio.to_thread(quota.check, user_id)
    except quota.UnknownUser as exc:
        return _error(404, str(exc))
    except Exception as exc:
        return _unavailable(exc, "GET /v1/quota")
    return _answer(models.QuotaAnswer(**answer.as_dict()))


async def metrics_text(_request: Request) -> Response:
    body, content_type = await asyncio.to_thread(health.exposition)
    return Response(body, media_type=content_type)


# -- Stripe webhooks ----------------------------------------------------------------------------------------


def _store_stripe_event(event: dict) -> bool:
    with db.transaction() as conn:
        return webhook.store(conn, event, utcnow())


async def stripe_webhook(request: Request) -> Response:
    """Verify, store in the inbox (committed before the 200), then queue stripe.process_event."""
    secrets = settings().stripe_webhook_secrets
    if not secrets:
        return _error(503, "STRIPE_WEBHOOK_SECRETS is empty: no Stripe event can be verified")
    try:
        body = await _read_body(request, webhook.MAX_BODY_BYTES)
    except BodyTooLarge:
        return _error(413, f"body is larger than {webhook.MAX_BODY_BYTES} bytes")
    try:
        event = webhook.verify(body, request.headers.get("stripe-signature"), secrets)
    except webhook.InvalidWebhook as exc:
        log.warning("stripe_webhook_rejected", reason=exc.reason)
        return _error(400, exc.reason)
    try:
        stored = await asyncio.to_thread(_store_stripe_event, event)
    except Exception as exc:
        return _unavailable(exc, "POST /webhooks/stripe")
    if stored:
        try:
            await asyncio.to_thread(webhook.enqueue, [event["id"]])
        except (kombu.exceptions.OperationalError, redis.RedisError) as exc:  # stored: maintenance.sweep queues it
            log.warning("stripe_event_not_queued", event_id=event["id"], error=health.first_line(exc))
    return _answer(models.StripeReceipt(received=True, duplicate=not stored))


# -- live sessions ------------------------------------------------------------------------------------------


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _grant(answer: sessions.Grant) -> models.SessionGrant:
    return models.SessionGrant(
        session_id=answer.session_id,
        granted_seconds=quota.seconds(answer.granted_ms),
        expires_at=_utc(answer.expires_at),
        remaining_seconds=quota.seconds(answer.remaining_ms),
        blocked=answer.blocked,
        used_seconds=quota.seconds(answer.used_ms),
        beyond_grant_seconds=quota.seconds(answer.beyond_grant_ms),
    )


def _ended(answer: sessions.Closed) -> models.SessionEnded:
    return models.SessionEnded(
        session_id=answer.session_id,
        state=answer.state,  # type: ignore[arg-type]
        recorded_seconds=quota.seconds(answer.recorded_ms),
        beyond_grant_seconds=quota.seconds(answer.beyond_grant_ms),
        ended_at=_utc(answer.ended_at),
    )


async def _session_body(request: Request, model: type[Body]) -> Body | Response:
    """The request's body as `model`, or the answer refusing it."""
    denied = _authorize(request)
    if denied is not None:
        return denied
    try:
        body = await _read_body(request, SESSION_BODY_BYTES)
    except BodyTooLarge:
        return _error(413, f"body is larger than {SESSION_BODY_BYTES} bytes")
    try:
        return msgspec.json.decode(body, type=model)
    except msgspec.MsgspecError as exc:
        return _error(400, f"malformed body: {exc}")


async def _run_session_call(call: sessions.Call, route: str) -> sessions.Grant | sessions.Closed | Response:
    try:
        return await asyncio.to_thread(sessions.run, call)
    except (quota.UnknownUser, sessions.UnknownSession) as exc:
        return _error(404, str(exc))
    except sessions.BadInput as exc:
        return _error(400, exc.reason)
    except Exception as exc:
        return _unavailable(exc, route)


async def start_session(request: Request) -> Response:
    body = await _session_body(request, models.SessionStart)
    if isinstance(body, Response):
        return body
    now = utcnow()
    answer = await _run_session_call(
        lambda conn: sessions.start(conn, body.user_id, body.language, now, body.conversation_id, body.feature),
        "POST /v1/sessions",
    )
    if isinstance(answer, Response):
        return answer
    assert isinstance(answer, sessions.Grant)  # a start always grants (0 when nothing is left)
    return _answer(_grant(answer), 201)


def _session_id(request: Request) -> str | Response:
    raw = request.path_params["session_id"]
    try:
        return str(UUID(raw))
    except ValueError:
        return _error(400, f"session_id is not a UUID: {raw[:64]!r}")


async def _session_report(request: Request) -> tuple[str, models.SessionReport] | Response:
    """The session id and the report of a heartbeat or an end, or the answer refusing them."""
    body = await _session_body(request, models.SessionReport)  # the token is checked first
    if isinstance(body, Response):
        return body
    session_id = _session_id(request)
    if isinstance(session_id, Response):
        return session_id
    return session_id, body


async def _reported(
    request: Request, call: Callable[..., Any], route: str
) -> sessions.Grant | sessions.Closed | Response:
    """A heartbeat's or an end's report run as `call(conn, session_id, used_seconds, now)`."""
    report = await _session_report(request)
    if isinstance(report, Response):
        return report
    session_id, body = report
    now = utcnow()
    return await _run_session_call(lambda conn: call(conn, session_id, body.used_seconds, now), route)


async def heartbeat(request: Request) -> Response:
    answer = await _reported(request, sessions.heartbeat, "POST /v1/sessions/heartbeat")
    if isinstance(answer, sessions.Closed):
        session_id = answer.session_id
        reason = (f"session {session_id} is {answer.state}: nothing was recorded; send its total to "
                  f"/v1/sessions/{session_id}/end and start a new session")  # fmt: skip
        return _answer(models.SessionOver(reason, _ended(answer)), 409)
    return answer if isinstance(answer, Response) else _answer(_grant(answer))


async def end_session(request: Request) -> Response:
    answer = await _reported(request, sessions.end, "POST /v1/sessions/end")
    if isinstance(answer, Response):
        return answer
    assert isinstance(answer, sessions.Closed)  # an end always closes
    return _answer(_ended(answer))


# -- the routes and their document --------------------------------------------------------------------------

ERROR_ANSWERS = {
    400: (models.Error, "malformed request; `error` says what is wrong"),
    401: (models.Error, "missing or unknown bearer token"),
    413: (models.Error, "body too large"),
    503: (models.Error, "a dependency is down, or the route is closed by configuration; retry later"),
}


def _errors(*statuses: int) -> dict[int, tuple]:
    return {status: ERROR_ANSWERS[status] for status in statuses}


SESSION_ID = models.path_parameter("session_id", "The session, as `POST /v1/sessions` answered it.")
ROUTES: list[tuple[models.Operation, Callable[..., Any]]] = [
    (models.Operation("GET", "/healthz", "The process is alive", {200: (models.TEXT, "`ok`")}), healthz),
    (models.Operation("GET", "/readyz", "PostgreSQL and Redis answer", {
        200: (models.Readiness, "ready"), 503: (models.Readiness, "what is down, and why")}), readyz),
    (models.Operation("GET", "/metrics", "Prometheus metrics", {200: (models.TEXT, "Prometheus text format")}),
     metrics_text),
    (models.Operation(
        "POST", "/v1/usage-events", "Record microphone usage: one event, or up to 1000",
        {202: (models.IngestAnswer, "each event committed, known or rejected"), **_errors(400, 401, 413, 503)},
        body=(models.UsageEvent, models.UsageEventBatch), secured=True), ingest_usage),
    (models.Operation(
        "GET", "/v1/quota/{user_id}", "A user's quota of this period",
        {200: (models.QuotaAnswer, "the quota"), **_errors(400, 401, 503), 404: (models.Error, "unknown user")},
        secured=True, parameters=(models.path_parameter("user_id", "A `profiles` row."),)), get_quota),
    (models.Operation(
        "POST", "/v1/sessions", "Start a live session and get its first grant",
        {201: (models.SessionGrant, "the session and its grant (0 when nothing is left)"),
         **_errors(400, 401, 413, 503), 404: (models.Error, "unknown user")},
        body=(models.SessionStart,), secured=True), start_session),
    (models.Operation(
        "POST", "/v1/sessions/{session_id}/heartbeat", "Report a live session's total; get a new grant",
        {200: (models.SessionGrant, "the new grant"),
         **_errors(400, 401, 413, 503), 404: (models.Error, "unknown session"),
         409: (models.SessionOver, "the session is over: nothing recorded")},
        body=(models.SessionReport,), secured=True, parameters=(SESSION_ID,)), heartbeat),
    (models.Operation(
        "POST", "/v1/sessions/{session_id}/end", "End a live session with its final total",
        {200: (models.SessionEnded, "recorded; repeating it changes nothing"),
         **_errors(400, 401, 413, 503), 404: (models.Error, "unknown session")},
        body=(models.SessionReport,), secured=True, parameters=(SESSION_ID,)), end_session),
    (models.Operation(
        "POST", "/webhooks/stripe", "Stripe's webhook: verified, stored, then processed",
        {200: (models.StripeReceipt, "stored (or stored before)"),
         **_errors(400, 413, 503)},
        body=(models.StripeEvent,),
        parameters=({"name": "Stripe-Signature", "in": "header", "required": True, "schema": {"type": "string"},
                     "description": "`t=<unix time>,v1=<HMAC-SHA256>` as Stripe signs it"},)), stripe_webhook),
]  # fmt: skip
OPENAPI = models.Operation("GET", "/openapi.json", "This document", {200: (dict, "the OpenAPI 3.1 document")})


def openapi() -> dict:
    operations = [operation for operation, _ in ROUTES] + [OPENAPI]
    return models.openapi_document(operations, "WorldSpeakAI metering worker", "1")


async def openapi_json(_request: Request) -> Response:
    return Response(msgspec.json.encode(DOCUMENT), media_type="application/json")


DOCUMENT = openapi()


@contextlib.asynccontextmanager
async def _lifespan(_app: Starlette) -> AsyncIterator[None]:
    gc.freeze()  # what startup built lives as long as the process: no full collection scans it again
    yield


def create_app() -> Starlette:
    configure_logging(settings().log_level)
    routes = [Route(op.path, endpoint, methods=[op.method]) for op, endpoint in ROUTES]
    routes.append(Route(OPENAPI.path, openapi_json, methods=[OPENAPI.method]))
    return Starlette(routes=routes, lifespan=_lifespan)


app = create_app()
