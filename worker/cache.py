"""Redis: the quota cache's client, one per process (created lazily, forgotten after a fork), and the names
of the keys that more than one module reads."""

from __future__ import annotations

import os

import redis

from worker.config import settings

_client: redis.Redis | None = None

# Each user's live-session reservations, a hash written only by worker.sessions' scripts; its field HELD
# is how many milliseconds the user's open sessions hold (the quota subtracts it from what remains).
LIVE_GRANTS_PREFIX = "live-grants:"
HELD = "held"
STALE = "stale"  # set when the user's plan or usage changed under the reservations: rebuild them


def live_grants_key(user_id: str) -> str:
    return LIVE_GRANTS_PREFIX + user_id


def redis_client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(
            settings().redis_url,
            socket_timeout=2,  # seconds: a hung Redis must fall back to PostgreSQL, not hang a request
            socket_connect_timeout=2,
            health_check_interval=30,
            decode_responses=True,
        )
    return _client


def _forget_client_after_fork() -> None:
    global _client
    _client = None


os.register_at_fork(after_in_child=_forget_client_after_fork)
