"""The exceptions the client raises: an API error answer, or no answer at all."""
from __future__ import annotations

from typing import Any


class GPT2JobsError(Exception):
    """Base class of everything this client raises on purpose."""


class APIError(GPT2JobsError):
    """The API answered with an error: {"error": {"code", "message", "param"}} and an HTTP status."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, body: Any = None):
        self.status, self.code, self.message, self.param, self.body = status, code, message, param, body
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status} {self.code}: {self.message}{where}"


class BadRequestError(APIError):
    """400: a bad query parameter, multipart field, file or archive."""


class AuthenticationError(APIError):
    """401: no API key, or one that is unknown or revoked."""


class NotFoundError(APIError):
    """404: no such id for this owner."""


class ConflictError(APIError):
    """409: a finished job cancelled or paused, a job resumed that is not paused, an idempotency key reused with
    another body, a file or model in use, a checkpoint whose files are gone (code checkpoint_gone)."""


class UnprocessableEntityError(APIError):
    """422: a job body that fails validation; `param` names the field."""


class ServiceUnavailableError(APIError):
    """503: the API's database cannot be reached (still so after the client's retries)."""


ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 409: ConflictError,
    422: UnprocessableEntityError, 503: ServiceUnavailableError,
}


class APIConnectionError(GPT2JobsError):
    """No answer from the API (connection refused or dropped, or a timeout), still so after the retries."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts
