"""Liveness and readiness for orchestrators and load balancers."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from jobs.queue import broker_reachable

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz():
    """The process is alive."""
    return jsonify(status="ok")


@health.get("/readyz")
def readyz():
    """The database and the broker are reachable; 503 naming what is not."""
    platform = current_app.extensions["gpt2jobs"]
    checks = {}
    try:
        with platform.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError:
        checks["database"] = "unreachable"
    checks["broker"] = "ok" if broker_reachable(platform.celery) else "unreachable"
    ready = all(v == "ok" for v in checks.values())
    return jsonify(status="ready" if ready else "unavailable", checks=checks), 200 if ready else 503
