"""The REST API: `gunicorn 'api:create_app()'`. Imports and runs without torch."""
from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_engine, make_session_factory
from jobs.queue import make_celery
from jobs.settings import Settings
from jobs.storage import ArtifactStore

from .batches import batches
from .dashboard import dashboard
from .errors import register_error_handlers
from .event_stream import StreamSlots
from .files import files
from .fine_tuning import fine_tuning_jobs
from .health import health
from .jobs import jobs
from .keys import keys
from .metrics_routes import job_metrics
from .model_routes import models
from .monitoring import register_monitoring
from .openapi import openapi


@dataclass
class Platform:
    """What the API's routes share: settings, the database and the queue client."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    artifacts: ArtifactStore
    celery: Celery
    stream_slots: StreamSlots


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    engine = make_engine(settings.database_url)
    app.extensions["gpt2jobs"] = Platform(
        settings, engine, make_session_factory(engine), ArtifactStore(settings.artifact_dir), make_celery(settings),
        StreamSlots(settings.event_streams),
    )
    register_error_handlers(app)
    register_monitoring(app)  # times every request; serves /metrics
    app.register_blueprint(health)
    app.register_blueprint(openapi)
    app.register_blueprint(files)
    app.register_blueprint(batches)
    app.register_blueprint(jobs)
    app.register_blueprint(models)
    app.register_blueprint(fine_tuning_jobs)
    app.register_blueprint(job_metrics)
    app.register_blueprint(dashboard)
    app.cli.add_command(keys)
    return app
