"""Procfile, docker-compose.yml and the Celery app agree with each other and with DESIGN.md."""

from __future__ import annotations

import yaml
from support.run import ROOT


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_procfile_has_the_contracted_processes() -> None:
    processes = procfile()
    assert set(processes) == {"release", "web", "worker", "beat"}
    assert processes["release"] == "python -m worker migrate"
    assert "-Q usage,stripe,maintenance" in processes["worker"]
    assert processes["worker"].startswith("celery -A worker worker")
    assert processes["beat"].startswith("celery -A worker beat")


def test_compose_runs_every_procfile_process_with_the_same_command() -> None:
    services = compose()["services"]
    processes = procfile()
    assert services["migrate"]["command"] == processes["release"]
    for name in ("web", "worker", "beat"):
        assert services[name]["command"] == processes[name], name


def test_compose_services_wait_for_healthy_postgres_redis_and_rabbitmq() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly yes" in services["redis"]["command"]
    assert "--maxmemory-policy noeviction" in services["redis"]["command"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13")
    for name in ("postgres", "redis", "rabbitmq"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["rabbitmq"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://")
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"  # quota cache, beat
        assert services[name]["environment"]["CELERY_BROKER_URL"].startswith("amqp://")
        assert "@rabbitmq:5672/" in services[name]["environment"]["CELERY_BROKER_URL"]
    assert services["web"]["environment"]["WEB_HOST"] == "0.0.0.0"
    metrics_dir = services["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    for name in ("web", "worker"):  # the web's /metrics sums the worker's files only if both see them
        assert f"metrics:{metrics_dir}" in services[name]["volumes"], name
    assert "healthcheck" in services["web"]


def test_compose_rabbitmq_keeps_its_queues_and_gives_workers_an_hour_to_acknowledge() -> None:
    rabbitmq = compose()["services"]["rabbitmq"]
    assert "rabbitmq-data:/var/lib/rabbitmq" in rabbitmq["volumes"]
    assert rabbitmq["hostname"]  # the node's data directory is named after it
    assert "rabbitmq-data" in compose()["volumes"]
    timeout_ms = int(rabbitmq["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"].split("consumer_timeout")[1])
    assert timeout_ms >= 3_600_000  # at least the visibility timeout Redis gives a worker


def test_compose_builds_from_the_dockerfile() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("FROM python:3.11")
    assert "COPY worker ./worker" in dockerfile and "schema.sql" in dockerfile
    for name in ("migrate", "web", "worker", "beat"):
        assert compose()["services"][name]["build"] == "."


def test_celery_app_routes_tasks_to_the_contracted_queues() -> None:
    from worker.celery import app

    assert {queue.name for queue in app.conf.task_queues} == {"usage", "stripe", "maintenance"}
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.result_backend is None
    assert app.conf.result_expires is None  # else beat schedules celery.backend_cleanup for a backend we lack
    for task, queue in [
        ("metering.record_usage", "usage"),
        ("metering.record_usage_batch", "usage"),
        ("stripe.process_event", "stripe"),
        ("maintenance.reset_monthly_usage", "maintenance"),
    ]:
        assert app.amqp.router.route({}, task)["queue"].name == queue
