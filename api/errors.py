"""Every error is JSON: {"error": {"code", "message", "param"}} with a stable code."""
from __future__ import annotations

import re

from flask import Flask, jsonify, request
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from jobs.errors import Conflict, DomainError, NotFound, TooLarge, new_reference
from jobs.models import JOB_TYPES
from jobs.storage import disk_full_error

from jobs.specs import METHOD_TAGS, MODEL_TAGS

DOMAIN_STATUS = ((NotFound, 404), (Conflict, 409), (TooLarge, 413))


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}


#: Statuses the openai SDK retries by default: a 409 here is a resource's state (a finished job, a file in use),
#: which the same request will meet again, so it says not to (the SDK honours x-should-retry).
NOT_RETRYABLE = {409}


def error_response(status: int, code: str, message: str, param: str | None = None):
    response = jsonify(error={"code": code, "message": message, "param": param})
    if status in NOT_RETRYABLE:
        response.headers["x-should-retry"] = "false"
    return response, status


def validation_param(error: ErrorDetails) -> str:
    """The dotted path of the field a pydantic error is about (discriminated-union tags dropped)."""
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a discriminator is wrong: the job's
        field = [str(p) for i, p in enumerate(error["loc"]) if i or p not in JOB_TYPES]  # type, or a field's
        return ".".join([*field, "type"])  # ("method.type")
    loc = list(error["loc"])
    if loc and loc[0] in JOB_TYPES:  # the job type's tag, always first
        loc = loc[1:]
    parts = [str(p) for i, p in enumerate(loc) if not (i and (loc[i - 1] == "model" and p in MODEL_TAGS
                                                              or loc[i - 1] == "method" and p in METHOD_TAGS))
             and not UNION_MEMBER.match(str(p))]
    return ".".join(parts) if parts else "body"


#: How pydantic names the member of a plain union an error is about ("constrained-int", "literal['auto']").
UNION_MEMBER = re.compile(r"^(constrained-\w+|literal\[.*\]|int|float|str|none)$")


def validation_message(errors: list[ErrorDetails]) -> str:
    """The first error's message; for a number that may also be "auto" (a union), says so."""
    first = errors[0]
    param = validation_param(first)
    also = [e for e in errors[1:] if validation_param(e) == param and str(e["loc"][-1]).startswith("literal[")]
    alternatives = " or ".join(str((e.get("ctx") or {}).get("expected", "")).replace("'", '"') for e in also)
    message = first["msg"].removeprefix("Value error, ") + (f", or {alternatives}" if alternatives else "")
    return f"{param}: {message}"


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        response, status = error_response(exc.status, exc.code, exc.message, exc.param)
        response.headers.update(exc.headers)
        if status == 401:  # RFC 9110: a 401 names the scheme it wants (RFC 6750 for bearer tokens)
            response.headers.setdefault("WWW-Authenticate", 'Bearer realm="gpt2-jobs"')
        return response, status

    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError):
        status = getattr(exc, "status", None) or next(
            (status for kind, status in DOMAIN_STATUS if isinstance(exc, kind)), 400)
        return error_response(status, exc.code, exc.message, exc.param)

    @app.errorhandler(ValidationError)
    def invalid_body(exc: ValidationError):
        errors = exc.errors(include_url=False)
        return error_response(422, "invalid_request", validation_message(errors), validation_param(errors[0]))

    @app.errorhandler(OperationalError)
    def database_unavailable(exc: OperationalError):
        app.logger.warning("database unavailable: %s", exc)
        return error_response(503, "database_unavailable", "The database cannot be reached; try again shortly.")

    @app.errorhandler(DataError)
    def unstorable_value(exc: DataError):
        # A last line of defence: the database refused a value from the request (one the checks before it let
        # through). The transaction was rolled back, so nothing was stored; it is the caller's input, not a 500.
        app.logger.warning("database refused a value: %s", exc)
        return error_response(400, "invalid_request", "A value in the request cannot be stored.")

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        param = "file" if request.mimetype == "multipart/form-data" else "body"
        return error_response(413, "too_large", "The request body is too large.", param)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # Werkzeug's own headers come along (a 405's Allow names the methods the route takes); its HTML body
        # does not: every error is the JSON error object.
        code = (exc.name or "error").lower().replace(" ", "_")
        response, status = error_response(exc.code or 500, code, exc.description or exc.name)
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, status

    @app.errorhandler(IntegrityError)
    def integrity_conflict(exc: IntegrityError):
        # A concurrent request changed what this one relied on (the checks before it hold locks, so this is a last
        # line of defence): nothing was stored. The details name tables and values: log them, answer in general.
        reference = new_reference()
        app.logger.warning("integrity error (reference %s): %s", reference, exc)
        response, status = error_response(409, "conflict", f"The request conflicts with a concurrent change; "
                                          f"nothing was stored (reference {reference}). Try again.")
        response.headers["x-should-retry"] = "true"  # a race, not a state: the same request may well succeed
        return response, status

    @app.errorhandler(OSError)
    def storage_full(exc: OSError):
        if disk_full_error(exc) is None:
            return unexpected(exc)
        # An upload or a model import met a full disk: what it had written is removed, nothing was stored.
        app.logger.error("disk full while storing a request's data: %s", exc)
        return error_response(507, "insufficient_storage", "The server has no disk space left to store this; "
                              "nothing was stored. Try again later.")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        reference = new_reference()
        app.logger.exception("unhandled error (reference %s)", reference)
        return error_response(500, "internal_error", f"An unexpected error occurred (reference {reference}; the "
                              "operators find the details under it in the API's log).")
