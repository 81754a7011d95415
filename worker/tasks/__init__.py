"""Celery tasks: thin wrappers that parse their arguments and call the domain functions."""
