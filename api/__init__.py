"""The REST API: `gunicorn 'api:create_app()'`. Imports and runs without torch."""
from __future__ import annotations

from dataclasses import dataclass

from flask import Flask
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_engine
from jobs.settings import Settings

from .errors import register_error_handlers
from .health import health
from .openapi import openapi


@dataclass
class Platform:
    """What the API's routes share: settings, the database and the queue client."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    engine = make_engine(settings.database_url)
    app.extensions["gpt2jobs"] = Platform(settings, engine, sessionmaker(engine, expire_on_commit=False))
    register_error_handlers(app)
    app.register_blueprint(health)
    app.register_blueprint(openapi)
    return app
