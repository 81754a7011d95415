"""The Celery application: queues, at-least-once delivery settings, the beat schedule.

`celery -A worker` finds it here (Celery looks for `worker.celery` when the package itself has no app).
Task modules are named, not imported, so this module stays plumbing: importing it builds the app without
importing any domain module.

Delivery is at least once and the tasks make it exactly once in effect (every write is idempotent on
the event id), so every setting here leans towards redelivering rather than losing a message:
- late acks: a message is acknowledged after its task returned, i.e. after the database commit;
- reject on worker lost: a pool process killed mid-task leaves its message to be delivered again;
- visibility timeout (CELERY_VISIBILITY_TIMEOUT, default 3600 s): how long Redis waits for the ack of
  a message whose worker died before giving it to another worker. It must exceed the longest task plus
  its time waiting in a prefetch buffer, or a slow task would run twice (harmless, but wasted work);
- prefetch multiplier 4 (CELERY_PREFETCH_MULTIPLIER): keeps the pool busy between round trips to Redis
  without hoarding; the single-event batcher raises the channel's prefetch to its own batch size;
- no result backend: producers never wait for results; outcomes are rows in PostgreSQL;
- the broker's own part (URL, transport, queue and exchange types) comes from worker.broker.
"""

from __future__ import annotations

import gc

from celery import Celery, signals

from worker import broker, metrics
from worker.config import BEAT_TASKS, settings
from worker.liveness import HeartbeatStep
from worker.logs import configure_logging

TASK_MODULES = ["worker.tasks.metering", "worker.tasks.stripe", "worker.tasks.maintenance"]
CONSUMER = "worker.tasks.consumer:DeadLetteringConsumer"


def create_app() -> Celery:
    config = settings()
    app = Celery("worldspeak", include=TASK_MODULES)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        result_backend=None,
        result_expires=None,  # no results, so no daily celery.backend_cleanup in the beat schedule
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_prefetch_multiplier=config.prefetch_multiplier,
        worker_concurrency=config.worker_concurrency,
        worker_max_memory_per_child=200_000,  # KiB: a pool process above 200 MB is replaced after its task
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="usage",
        task_default_exchange="usage",
        task_default_routing_key="usage",
        task_routes={
            "metering.*": {"queue": "usage"},
            "stripe.*": {"queue": "stripe"},
            "maintenance.*": {"queue": "maintenance"},
            "sessions.*": {"queue": "maintenance"},
        },
        worker_consumer=CONSUMER,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
        beat_scheduler="redbeat.RedBeatScheduler",
        redbeat_redis_url=config.redis_url,
        # Redis client options of redbeat itself (else it falls back to broker_transport_options, with a
        # deprecation warning): keep retrying Redis for a minute, so a Redis restart does not stop beat.
        redbeat_redis_options={"retry_period": 60},
        redbeat_lock_timeout=300,  # seconds: a second beat waits this long for a dead one's lock
        beat_max_loop_interval=5,  # seconds: redbeat holds its lock while it loops
        # A run not started within its interval is dropped (the next one is due anyway), so jobs do not
        # pile up in the queue while the workers are down.
        beat_schedule={
            BEAT_TASKS[job]: {"task": BEAT_TASKS[job], "schedule": interval, "options": {"expires": interval}}
            for job, interval in config.schedule.items()
        },
        **broker.celery_conf(config),
    )
    app.steps["worker"].add(HeartbeatStep)
    return app


@signals.setup_logging.connect
def _configure_logging(**_kwargs: object) -> None:
    configure_logging(settings().log_level)


@signals.worker_init.connect
def _start_metrics_fleet(**_kwargs: object) -> None:
    metrics.start_fleet()  # in the main process, before the pool's children exist


@signals.worker_init.connect
@signals.worker_process_init.connect
def _freeze_startup_objects(**_kwargs: object) -> None:
    """Everything imported and built at startup lives as long as the process: frozen, the garbage
    collector stops scanning it at every full collection (a third of the CPU of validating and totalling
    a batch went to those scans). In the main process before the pool forks, and in each pool process."""
    gc.freeze()


@signals.worker_process_shutdown.connect
def _forget_pool_process_metrics(**_kwargs: object) -> None:
    metrics.process_exited()


app = create_app()
