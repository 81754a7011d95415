"""Configuration: every variable parsed once, with defaults, and a clear error on a malformed value."""

from __future__ import annotations

import pytest

from worker.config import ConfigError, load_settings


def test_defaults_point_at_the_local_services() -> None:
    config = load_settings({})
    assert config.database_url == "postgresql://postgres@localhost:5432/worldspeak"
    assert config.redis_url == "redis://localhost:6379/0"
    assert config.visibility_timeout == 3600
    assert config.plan_minutes == {"free": 60, "standard": 900, "premium": 3000, "enterprise": 10000}
    assert config.ingest_api_tokens == ()
    assert config.stripe_webhook_secrets == ()
    assert (config.usage_max_event_seconds, config.usage_max_future_seconds, config.usage_max_lateness_days) == (
        14400,
        300,
        35,
    )
    assert (config.session_grant_seconds, config.session_ttl_seconds) == (60, 120)


def test_lists_and_pairs_are_parsed() -> None:
    config = load_settings(
        {
            "STRIPE_WEBHOOK_SECRETS": "whsec_a, whsec_b,",
            "INGEST_API_TOKENS": "t1,t2",
            "STRIPE_PRICE_PLANS": "price_1=standard, price_2=premium",
            "PLAN_MINUTES": "premium=5000",
        }
    )
    assert config.stripe_webhook_secrets == ("whsec_a", "whsec_b")
    assert config.ingest_api_tokens == ("t1", "t2")
    assert config.stripe_price_plans == {"price_1": "standard", "price_2": "premium"}
    assert config.plan_minutes["premium"] == 5000
    assert config.plan_minutes["free"] == 60  # plans not named keep their defaults


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CELERY_VISIBILITY_TIMEOUT": "soon"}, "CELERY_VISIBILITY_TIMEOUT must be an integer"),
        ({"CELERY_VISIBILITY_TIMEOUT": "0"}, "CELERY_VISIBILITY_TIMEOUT must be >= 1"),
        ({"USAGE_MAX_EVENT_SECONDS": "1.5"}, "USAGE_MAX_EVENT_SECONDS must be an integer"),
        ({"PLAN_MINUTES": "gold=10"}, "unknown plan 'gold'"),
        ({"PLAN_MINUTES": "free=sixty"}, "whole number of minutes"),
        ({"PLAN_MINUTES": "free"}, "key=value"),
        ({"STRIPE_PRICE_PLANS": "price_1=platinum"}, "unknown plan 'platinum'"),
        ({"DATABASE_URL": "mysql://localhost/x"}, "DATABASE_URL must start with"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL must start with"),
        ({"CELERY_BROKER_URL": "sqs://queue"}, "CELERY_BROKER_URL must start with"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be"),
        ({"USAGE_FLUSH_INTERVAL": "-1"}, "USAGE_FLUSH_INTERVAL must be > 0"),
        ({"SESSION_GRANT_SECONDS": "0"}, "SESSION_GRANT_SECONDS must be >= 1"),
        ({"SESSION_TTL_SECONDS": "2m"}, "SESSION_TTL_SECONDS must be an integer"),
    ],
)
def test_malformed_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ)


def test_the_broker_is_redis_unless_celery_broker_url_names_another() -> None:
    assert load_settings({}).broker_url == "redis://localhost:6379/0"
    assert load_settings({"REDIS_URL": "redis://cache:6379/2"}).broker_url == "redis://cache:6379/2"
    rabbitmq = load_settings({"REDIS_URL": "redis://cache:6379/2", "CELERY_BROKER_URL": "amqp://u:p@mq:5672//"})
    assert (rabbitmq.broker_url, rabbitmq.redis_url) == ("amqp://u:p@mq:5672//", "redis://cache:6379/2")
    assert load_settings({"CELERY_BROKER_URL": " "}).broker_url == "redis://localhost:6379/0"
