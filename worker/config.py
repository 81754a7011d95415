"""Configuration from the environment, parsed once per process.

Every variable has a local default so a fresh checkout runs against the machine's own services.
A malformed value stops the process at start with a message naming the variable.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_PLAN_MINUTES = {"free": 60, "standard": 900, "premium": 3000, "enterprise": 10000}
PLAN_TYPES = ("free", "standard", "premium", "enterprise")
QUEUES = ("usage", "stripe", "maintenance")  # the worker's queues, each with its own exchange


class ConfigError(ValueError):
    """A configuration variable has a value the worker cannot use."""


@dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql://postgres@localhost:5432/worldspeak"
    redis_url: str = "redis://localhost:6379/0"
    broker_url: str = "redis://localhost:6379/0"  # CELERY_BROKER_URL; REDIS_URL when unset
    visibility_timeout: int = 3600  # seconds
    stripe_webhook_secrets: tuple[str, ...] = ()
    stripe_api_key: str = ""
    stripe_api_base: str = "https://api.stripe.com"
    stripe_price_plans: Mapping[str, str] = field(default_factory=dict)
    plan_minutes: Mapping[str, int] = field(default_factory=dict)
    ingest_api_tokens: tuple[str, ...] = ()
    usage_max_event_seconds: int = 14400
    usage_max_future_seconds: int = 300
    usage_max_lateness_days: int = 35
    session_grant_seconds: int = 60  # the most one live-session grant runs ahead of the usage reported
    session_ttl_seconds: int = 120  # a live session silent this long expires
    # Not in the public contract; operational knobs with safe defaults.
    log_level: str = "INFO"
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    web_concurrency: int = 2  # uvicorn worker processes
    worker_concurrency: int = 2  # Celery prefork processes
    prefetch_multiplier: int = 4
    usage_flush_every: int = 1000  # events coalesced into one transaction by metering.record_usage
    usage_flush_interval: float = 0.05  # seconds a partial coalesced batch waits
    quota_cache_ttl: int = 900  # seconds a cached quota answer is trusted
    pg_lock_timeout: float = 5.0  # seconds a statement waits for a lock before its work is retried
    pg_idle_in_transaction_timeout: float = 15.0  # seconds before PostgreSQL ends a transaction left idle
    schedule: Mapping[str, float] = field(default_factory=dict)  # beat job -> interval in seconds

    def minutes_for_plan(self, plan: str) -> int:
        return self.plan_minutes[plan]


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {raw!r}")
    return value


def _list(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in environ.get(name, "").split(",") if item.strip())


def _pairs(environ: Mapping[str, str], name: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in _list(environ, name):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{name} must look like key=value,key=value; bad item {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _plan_minutes(environ: Mapping[str, str]) -> dict[str, int]:
    minutes = dict(DEFAULT_PLAN_MINUTES)  # a variable naming some plans keeps the others' defaults
    for plan, value in _pairs(environ, "PLAN_MINUTES").items():
        if plan not in PLAN_TYPES:
            raise ConfigError(f"PLAN_MINUTES names unknown plan {plan!r}; plans are {', '.join(PLAN_TYPES)}")
        if not value.isdigit():
            raise ConfigError(f"PLAN_MINUTES for {plan} must be a whole number of minutes, got {value!r}")
        minutes[plan] = int(value)
    return minutes


def _price_plans(environ: Mapping[str, str]) -> dict[str, str]:
    plans = _pairs(environ, "STRIPE_PRICE_PLANS")
    for price, plan in plans.items():
        if plan not in PLAN_TYPES:
            raise ConfigError(f"STRIPE_PRICE_PLANS maps {price} to unknown plan {plan!r}")
    return plans


SCHEDULE_DEFAULTS = {  # seconds between runs of each beat job
    "reset_monthly_usage": 60.0,
    "ensure_partitions": 3600.0,
    "refresh_materialized_views": 600.0,
    "aggregate_usage": 300.0,
    "sweep": 60.0,
    "stripe_reconcile": 86400.0,
    "expire_sessions": 30.0,  # sessions.expire: a silent session's grant returns within its TTL and this
}
BEAT_TASKS = {  # the task each beat job runs; a job's name is also its maintenance_runs.job
    "reset_monthly_usage": "maintenance.reset_monthly_usage",
    "ensure_partitions": "maintenance.ensure_partitions",
    "refresh_materialized_views": "maintenance.refresh_materialized_views",
    "aggregate_usage": "maintenance.aggregate_usage",
    "sweep": "maintenance.sweep",
    "stripe_reconcile": "stripe.reconcile",  # on the stripe queue: it talks to Stripe's API
    "expire_sessions": "sessions.expire",  # on the maintenance queue
}


NEEDS_STRIPE_API = frozenset({"stripe_reconcile"})  # scheduled only with STRIPE_API_KEY: no key, nothing to do


def _schedule(environ: Mapping[str, str], stripe_api: bool) -> dict[str, float]:
    return {
        job: _float(environ, f"SCHEDULE_{job.upper()}_SECONDS", default)
        for job, default in SCHEDULE_DEFAULTS.items()
        if stripe_api or job not in NEEDS_STRIPE_API
    }


def _url(environ: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = environ.get(name, "").strip() or default
    if not value.startswith(schemes):
        raise ConfigError(f"{name} must start with one of {', '.join(schemes)}, got {value.split('@')[-1]!r}")
    return value


def _broker_url(environ: Mapping[str, str], redis_url: str) -> str:
    """CELERY_BROKER_URL: Redis (the embedded default, REDIS_URL itself) or RabbitMQ."""
    if not environ.get("CELERY_BROKER_URL", "").strip():
        return redis_url
    return _url(environ, "CELERY_BROKER_URL", redis_url, ("redis://", "rediss://", "amqp://", "amqps://"))


def load_settings(environ: Mapping[str, str]) -> Settings:
    base = Settings()
    redis_url = _url(environ, "REDIS_URL", base.redis_url, ("redis://", "rediss://", "unix://"))
    log_level = environ.get("LOG_LEVEL", base.log_level).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    return Settings(
        database_url=_url(environ, "DATABASE_URL", base.database_url, ("postgresql://", "postgres://")),
        redis_url=redis_url,
        broker_url=_broker_url(environ, redis_url),
        visibility_timeout=_int(environ, "CELERY_VISIBILITY_TIMEOUT", base.visibility_timeout, minimum=1),
        stripe_webhook_secrets=_list(environ, "STRIPE_WEBHOOK_SECRETS"),
        stripe_api_key=environ.get("STRIPE_API_KEY", "").strip(),
        stripe_api_base=(environ.get("STRIPE_API_BASE", "").strip() or base.stripe_api_base).rstrip("/"),
        stripe_price_plans=_price_plans(environ),
        plan_minutes=_plan_minutes(environ),
        ingest_api_tokens=_list(environ, "INGEST_API_TOKENS"),
        usage_max_event_seconds=_int(environ, "USAGE_MAX_EVENT_SECONDS", base.usage_max_event_seconds, minimum=1),
        usage_max_future_seconds=_int(environ, "USAGE_MAX_FUTURE_SECONDS", base.usage_max_future_seconds),
        usage_max_lateness_days=_int(environ, "USAGE_MAX_LATENESS_DAYS", base.usage_max_lateness_days),
        session_grant_seconds=_int(environ, "SESSION_GRANT_SECONDS", base.session_grant_seconds, minimum=1),
        session_ttl_seconds=_int(environ, "SESSION_TTL_SECONDS", base.session_ttl_seconds, minimum=1),
        log_level=log_level,
        web_host=environ.get("WEB_HOST", "").strip() or base.web_host,
        web_port=_int(environ, "PORT", base.web_port, minimum=1),
        web_concurrency=_int(environ, "WEB_CONCURRENCY", base.web_concurrency, minimum=1),
        worker_concurrency=_int(environ, "WORKER_CONCURRENCY", base.worker_concurrency, minimum=1),
        prefetch_multiplier=_int(environ, "CELERY_PREFETCH_MULTIPLIER", base.prefetch_multiplier, minimum=1),
        usage_flush_every=_int(environ, "USAGE_FLUSH_EVERY", base.usage_flush_every, minimum=1),
        usage_flush_interval=_float(environ, "USAGE_FLUSH_INTERVAL", base.usage_flush_interval),
        quota_cache_ttl=_int(environ, "QUOTA_CACHE_TTL", base.quota_cache_ttl, minimum=1),
        pg_lock_timeout=_float(environ, "PG_LOCK_TIMEOUT_SECONDS", base.pg_lock_timeout),
        pg_idle_in_transaction_timeout=_float(
            environ, "PG_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", base.pg_idle_in_transaction_timeout
        ),
        schedule=_schedule(environ, stripe_api=bool(environ.get("STRIPE_API_KEY", "").strip())),
    )


@functools.cache
def settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return load_settings(os.environ)
