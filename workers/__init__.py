"""Celery workers: ``celery -A workers worker --queues train,generate``.

Exposes ``app`` (and ``celery``, the name Celery's ``-A`` also looks for); importing the package registers the
tasks. The broker comes from ``jobs.settings.Settings.from_env()`` (``BROKER_URL``; default ``filesystem://``).
"""
from workers.app import app
from workers import tasks  # noqa: F401  (registers the tasks on app)

celery = app

__all__ = ["app", "celery", "tasks"]
