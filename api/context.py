"""What every /v1 route shares: the caller's identity, a unit-of-work session, paging and JSON shapes."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

from flask import Blueprint, current_app, g, request
from sqlalchemy.orm import Session

from jobs import repository
from jobs.db import session_scope
from jobs.models import unix_time
from jobs.repository import MAX_PAGE_SIZE
from jobs.text import storable

from .errors import ApiError


def platform():
    return current_app.extensions["gpt2jobs"]


@contextmanager
def unit_of_work() -> Iterator[Session]:
    with session_scope(platform().sessions) as session:
        yield session


def owner() -> str:
    return g.owner


def require_api_key() -> None:
    """Before every /v1 request: the bearer key's owner becomes g.owner, else 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if not header:
        raise ApiError(401, "missing_api_key", "Send your API key as 'Authorization: Bearer <key>'.")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "invalid_api_key", "The Authorization header must be 'Bearer <key>'.")
    with unit_of_work() as session:
        found = repository.authenticate(session, secret.strip())
    if found is None:
        raise ApiError(401, "invalid_api_key", "The API key is not valid or has been revoked.")
    g.owner = found


def comparable(text: str) -> bool:
    """Whether a path id or query value can be compared with an identifier column: no NUL (PostgreSQL refuses
    it in a query) and no unpaired surrogates (not text)."""
    return "\x00" not in text and storable(text)


def reject_unstorable_text() -> None:
    """Before every /v1 request, after authentication: path ids and query values the database cannot take are
    a 400 naming them, not a database error."""
    for name, value in [*(request.view_args or {}).items(), *request.args.items(multi=True)]:
        if isinstance(value, str) and not comparable(value):
            raise ApiError(400, "invalid_request", f"{name} must not contain NUL characters or unpaired surrogates",
                           name)


def check_form_fields(*names: str) -> None:
    """400 naming a multipart field other than `names` (a setting this server does not have, such as the openai
    SDK's expires_after, is refused rather than ignored), or one sent more than once: which copy was meant is not
    for the server to guess."""
    for name in [*request.form, *request.files]:
        if name not in names:
            shown = name if storable(name) and len(name) <= 64 else ascii(name[:64])
            raise ApiError(400, "invalid_request", f"the multipart field {shown!r} is not supported (fields: "
                           f"{', '.join(names)})", shown)
    for name in names:
        if len(request.form.getlist(name)) + len(request.files.getlist(name)) > 1:
            raise ApiError(400, "invalid_request", f"the multipart field '{name}' was sent more than once", name)


def v1_blueprint(name: str) -> Blueprint:
    blueprint = Blueprint(name, __name__, url_prefix="/v1")
    blueprint.before_request(require_api_key)
    blueprint.before_request(reject_unstorable_text)
    return blueprint


MAX_INT_CURSOR = 2**31 - 1  # integer ids and indexes are 32-bit INTEGER columns
DEFAULT_PAGE_SIZE = 20


def query_integer(name: str, raw: str, low: int, high: int) -> int:
    """A query value as an integer from `low` to `high`, written as JSON writes integers (ASCII digits, an
    optional minus): Python's int() would also take "+5", " 5", "5_0" and other scripts' digits, which the
    document's `integer` does not."""
    if not re.fullmatch(r"-?[0-9]+", raw):
        raise ApiError(400, "invalid_request", f"{name} must be an integer from {low} to {high}, got {raw!r}", name)
    number = int(raw)
    if not low <= number <= high:
        raise ApiError(400, "invalid_request", f"{name} must be from {low} to {high}, got {number}", name)
    return number


def paging(cursor_type: type = str) -> dict[str, Any]:
    """`after` and `limit` from the query string, as repository list functions take them. The bounds are the
    ones the OpenAPI document declares (api.openapi imports them)."""
    limit = query_integer("limit", request.args.get("limit", str(DEFAULT_PAGE_SIZE)), 1, MAX_PAGE_SIZE)
    after: str | int | None = request.args.get("after")
    if isinstance(after, str) and cursor_type is int:
        after = query_integer("after", after, 0, MAX_INT_CURSOR)
    return {"after": after, "limit": limit}


def page(items: list[Any], has_more: bool, shape) -> dict[str, Any]:
    data = [shape(item) for item in items]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


unix = unix_time  # jobs.models' rule: the same seconds in every answer
