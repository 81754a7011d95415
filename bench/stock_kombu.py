"""The worker's app on kombu's own Redis transport, for bench.broker_kills only: `celery -A
bench.stock_kombu worker` shows what worker.redis_transport saves."""

from __future__ import annotations

from worker.celery import app

app.conf.broker_transport = "redis"
