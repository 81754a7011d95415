"""The `web` process: Stripe's webhook receiver, the ingest and quota API, health and metrics."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from worker import db
from worker.cache import redis_client
from worker.config import settings
from worker.logs import configure_logging, get_logger

log = get_logger(__name__)

READINESS_TIMEOUT = 2.0  # seconds for each dependency check


async def healthz(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _check_postgres() -> None:
    with db.engine().connect() as conn:
        conn.execute(sa.text("SET LOCAL statement_timeout = 2000"))
        conn.execute(sa.text("SELECT 1"))


def _check_redis() -> None:
    redis_client().ping()


async def readyz(_request: Request) -> JSONResponse:
    checks = {"postgresql": _check_postgres, "redis": _check_redis}
    results = await asyncio.gather(
        *(asyncio.wait_for(asyncio.to_thread(check), READINESS_TIMEOUT) for check in checks.values()),
        return_exceptions=True,
    )
    down = {
        name: f"{type(result).__name__}: {result}"
        for name, result in zip(checks, results, strict=True)
        if result is not None
    }
    if down:
        log.warning("not_ready", down=down)
        return JSONResponse({"status": "unavailable", "down": down}, status_code=503)
    return JSONResponse({"status": "ready"})


def create_app() -> Starlette:
    configure_logging(settings().log_level)
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]
    return Starlette(routes=routes)


app = create_app()
