"""Every error is JSON: {"error": {"code", "message", "param"}} with a stable code."""
from __future__ import annotations

from flask import Flask, jsonify
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from jobs.errors import Conflict, DomainError, NotFound, TooLarge

DOMAIN_STATUS = ((NotFound, 404), (Conflict, 409), (TooLarge, 413))


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def error_response(status: int, code: str, message: str, param: str | None = None):
    return jsonify(error={"code": code, "message": message, "param": param}), status


def validation_param(error: dict) -> str:
    """The dotted path of the field a pydantic error is about (discriminated-union tags dropped)."""
    parts = [str(p) for p in error["loc"] if p not in ("train", "finetune", "generate")]
    return ".".join(parts) if parts else "body"


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.param)

    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError):
        status = next((status for kind, status in DOMAIN_STATUS if isinstance(exc, kind)), 400)
        return error_response(status, exc.code, exc.message, exc.param)

    @app.errorhandler(ValidationError)
    def invalid_body(exc: ValidationError):
        first = exc.errors(include_url=False)[0]
        param = validation_param(first)
        return error_response(422, "invalid_request", f"{param}: {first['msg']}", param)

    @app.errorhandler(OperationalError)
    def database_unavailable(exc: OperationalError):
        app.logger.warning("database unavailable: %s", exc)
        return error_response(503, "database_unavailable", "The database cannot be reached; try again shortly.")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return error_response(500, "internal_error", "An unexpected error occurred.")
