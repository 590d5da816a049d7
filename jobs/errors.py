"""Domain errors. Each has a stable `code`; the API maps the classes to HTTP statuses (404, 409, 400, 413)."""
from __future__ import annotations

import secrets


def new_reference() -> str:
    """A short id ("err-3f9c0a1b2c4d") that joins an internal error's answer to the log line holding its details."""
    return f"err-{secrets.token_hex(6)}"


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotFound(DomainError):
    """The resource does not exist, or belongs to another owner (the two are indistinguishable on purpose)."""

    code = "not_found"

    def __init__(self, resource: str, id: str) -> None:
        super().__init__(f"No {resource} with id {id!r}", param=None)
        self.resource = resource
        self.id = id


class Conflict(DomainError):
    """The request is valid but clashes with the resource's current state."""

    code = "conflict"


class InvalidInput(DomainError):
    code = "invalid_input"

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message, param)


class InvalidRequest(InvalidInput):
    """A field of the request breaks a rule that the request's schema alone cannot tell (a limit that depends on
    settings or on a referenced model). The API answers 422, or 400 for a multipart form field (`status`)."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None, status: int = 422) -> None:
        super().__init__(message, param)
        self.status = status


class TooLarge(InvalidInput):
    """An upload exceeded its size limit."""

    code = "too_large"


class BrokerUnavailable(Exception):
    """The message broker could not be reached (or refused the message): the job was not enqueued.

    Not a DomainError: the request was fine, the infrastructure is not (the API answers 503). Raised by
    `jobs.queue.enqueue`.
    """

    code = "broker_unavailable"
