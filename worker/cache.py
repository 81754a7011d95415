"""Redis: the quota cache's client, one per process (created lazily, forgotten after a fork)."""

from __future__ import annotations

import os

import redis

from worker.config import settings

_client: redis.Redis | None = None


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
