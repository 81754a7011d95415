"""The `web` process: Stripe's webhook receiver, the ingest and quota API, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
from collections.abc import AsyncIterator
from uuid import UUID

import kombu.exceptions
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from worker import db, health, ingest, quota
from worker.clock import utcnow
from worker.config import settings
from worker.logs import configure_logging, get_logger
from worker.stripe import webhook

log = get_logger(__name__)


async def healthz(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def readyz(_request: Request) -> JSONResponse:
    down = await health.unavailable()
    if down:
        log.warning("not_ready", down=down)
        return JSONResponse({"status": "unavailable", "down": down}, status_code=503)
    return JSONResponse({"status": "ready"})


# -- ingest and quota API ----------------------------------------------------------------------------------


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _token_matches(presented: str, tokens: tuple[str, ...]) -> bool:
    """Constant time: every token is compared, so timing tells neither which token matched nor how early."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented.encode(), token.encode())
    return matched


def _authorize(request: Request) -> JSONResponse | None:
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


def _unavailable(exc: Exception, route: str) -> JSONResponse:
    """503 when Redis or PostgreSQL is down (the caller retries the whole request safely); other errors raise."""
    if isinstance(exc, (kombu.exceptions.OperationalError, redis.RedisError)):
        down = "Redis"
    elif db.is_transient(exc):
        down = "PostgreSQL"
    else:
        raise exc
    log.warning("dependency_unavailable", route=route, down=down, error=health.first_line(exc))
    return _error(503, f"{down} is unavailable; retry later", {"Retry-After": "5"})


async def ingest_usage(request: Request) -> JSONResponse:
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
    return JSONResponse(ingest.answer(outcome), status_code=202)


async def get_quota(request: Request) -> JSONResponse:
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
    return JSONResponse(answer.as_dict())


async def metrics_text(_request: Request) -> Response:
    body, content_type = await asyncio.to_thread(health.exposition)
    return Response(body, media_type=content_type)


# -- Stripe webhooks ----------------------------------------------------------------------------------------


def _store_stripe_event(event: dict) -> bool:
    with db.transaction() as conn:
        return webhook.store(conn, event, utcnow())


async def stripe_webhook(request: Request) -> JSONResponse:
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
    return JSONResponse({"received": True, "duplicate": not stored})


@contextlib.asynccontextmanager
async def _lifespan(_app: Starlette) -> AsyncIterator[None]:
    gc.freeze()  # what startup built lives as long as the process: no full collection scans it again
    yield


def create_app() -> Starlette:
    configure_logging(settings().log_level)
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_text),
        Route("/v1/usage-events", ingest_usage, methods=["POST"]),
        Route("/v1/quota/{user_id}", get_quota),
        Route("/webhooks/stripe", stripe_webhook, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=_lifespan)


app = create_app()
