"""WorldSpeakAI metering and billing worker. The Celery app is in worker.celery (`celery -A worker`)."""
