"""The stack the client's tests run against: gunicorn and a celery worker on the embedded default (SQLite and the
filesystem broker), started once per test module."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Stack, module_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with module_stack(tmp_path_factory, "client") as platform:
        yield platform
