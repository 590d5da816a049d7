"""The transport under every resource: one httpx.Client, JSON errors raised as APIError, and retries.

What is retried, with exponential backoff (and a server's Retry-After, bounded), up to `max_retries` times:

* a request that never reached the server (connection refused or not made: httpx.ConnectError, ConnectTimeout)
  and a 503 (the API stored nothing), for every request;
* a request whose answer was lost (httpx.ReadTimeout, RemoteProtocolError) only where repeating it is safe:
  GET, DELETE, and a POST sent with an Idempotency-Key (a job submission, which the client always keys).

No other 4xx or 5xx is retried.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx

from .errors import ERRORS_BY_STATUS, APIConnectionError, APIError

#: Errors raised before the request reached the server: always safe to repeat.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
#: Errors after which the request may have been processed: repeated only when that is harmless.
ANSWER_LOST = (httpx.ReadTimeout, httpx.RemoteProtocolError)
SAFE_METHODS = frozenset({"GET", "HEAD", "DELETE"})
MAX_BACKOFF = 8.0

#: Builds the multipart `files` of one attempt; files it opens are entered on the ExitStack (closed after).
FilesFactory = Callable[[ExitStack], dict[str, Any]]


def raise_for_error(response: httpx.Response) -> None:
    """An APIError (the subclass for its status) from an error response; a response already read."""
    if response.status_code < 400:
        return
    body: Any = None
    try:
        body = response.json()
        error = body["error"]
        code, message, param = str(error["code"]), str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        code, message, param = "http_error", (response.text[:500] or response.reason_phrase), None
    kind = ERRORS_BY_STATUS.get(response.status_code, APIError)
    raise kind(response.status_code, code, message, param, body)


class Transport:
    def __init__(self, base_url: str, api_key: str | None, *, timeout: float, max_retries: int,
                 backoff_factor: float, transport: httpx.BaseTransport | None = None):
        headers = {"User-Agent": "gpt2jobs-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.max_retries = max_retries
        self.backoff_factor = backoff_factor

    def close(self) -> None:
        self.http.close()

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before retry number `attempt` (1, 2, ...): the server's Retry-After if it gave one, else
        backoff_factor * 2**(attempt - 1) with jitter; never more than MAX_BACKOFF."""
        if response is not None:
            try:
                return min(float(response.headers.get("Retry-After", "")), MAX_BACKOFF)
            except ValueError:
                pass
        return min(self.backoff_factor * 2 ** (attempt - 1) * random.uniform(0.75, 1.25), MAX_BACKOFF)

    @contextmanager
    def send(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
             data: dict[str, Any] | None = None, files: FilesFactory | None = None,
             headers: dict[str, str] | None = None, stream: bool = False,
             retry_unavailable: bool = True) -> Iterator[httpx.Response]:
        """The first answer that is not retried, error answers raised as APIError. With stream=True the body is
        not read yet: the caller reads it inside the `with`. retry_unavailable=False raises a 503 at once (for
        callers with their own plan for it)."""
        method = method.upper()
        repeatable = method in SAFE_METHODS or (headers or {}).get("Idempotency-Key") is not None
        retryable: tuple[type[Exception], ...] = NOT_SENT + ANSWER_LOST if repeatable else NOT_SENT
        if params:
            params = {k: v for k, v in params.items() if v is not None}
        attempt = 0
        while True:
            with ExitStack() as stack:
                request = self.http.build_request(method, path, params=params, json=json, data=data,
                                                  files=files(stack) if files is not None else None, headers=headers)
                try:
                    response = self.http.send(request, stream=stream)
                except retryable as exc:
                    if attempt >= self.max_retries:
                        raise APIConnectionError(f"{method} {request.url}: {type(exc).__name__}: {exc or 'no answer'} "
                                                 f"(after {attempt + 1} attempts)", attempt + 1) from exc
                    attempt += 1
                    time.sleep(self.delay(attempt, None))
                    continue
                except httpx.TransportError as exc:
                    raise APIConnectionError(f"{method} {request.url}: {type(exc).__name__}: {exc}", attempt + 1) from exc
                try:
                    if response.status_code == 503 and retry_unavailable and attempt < self.max_retries:
                        response.read()
                        attempt += 1
                        time.sleep(self.delay(attempt, response))
                        continue
                    if response.status_code >= 400:
                        response.read()
                        raise_for_error(response)
                    yield response
                    return
                finally:
                    response.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A whole (read) answer."""
        with self.send(method, path, **kwargs) as response:
            return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a paged list, page by page as they are needed (after = the last page's last_id)."""
        query = dict(params or {})
        while True:
            page = self.json("GET", path, params=query)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            query["after"] = page["last_id"]
