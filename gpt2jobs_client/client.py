"""The client: one connection pool, and the resources on it."""
from __future__ import annotations

import os
from typing import Any

import httpx

from ._http import Transport
from .files import Files
from .jobs import Jobs
from .models import Models

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


class Client:
    """A client for one gpt2-jobs API.

    `base_url` defaults to $GPT2JOBS_API_URL (else http://127.0.0.1:8000), `api_key` to $GPT2JOBS_API_KEY.
    Connection errors and 503s are retried up to `max_retries` times with exponential backoff starting at
    `backoff_factor` seconds (see gpt2jobs_client._http). `transport` is an httpx transport to use instead of the
    network's (tests, proxies)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, backoff_factor: float = 0.5, transport: httpx.BaseTransport | None = None):
        self.base_url = base_url or os.environ.get("GPT2JOBS_API_URL") or DEFAULT_BASE_URL
        api_key = api_key if api_key is not None else os.environ.get("GPT2JOBS_API_KEY")
        self._transport = Transport(self.base_url, api_key, timeout=timeout, max_retries=max_retries,
                                    backoff_factor=backoff_factor, transport=transport)
        self.files = Files(self._transport)
        self.jobs = Jobs(self._transport)
        self.models = Models(self._transport)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"
