"""WorldSpeakAI metering and billing worker. `celery -A worker` finds the Celery app here."""

from worker.celery_app import app

__all__ = ["app"]
