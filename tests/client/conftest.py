"""The stack the client's tests run against: gunicorn and a celery worker on the embedded default (SQLite and the
filesystem broker), started once per test module."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ServiceProcess, service_env, venv_command
from tests.e2e.conftest import LEASE_SECONDS, Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    started: list[ServiceProcess] = []

    def launch(argv: list[str], overrides: dict[str, str], name: str) -> ServiceProcess:
        started.append(ServiceProcess(venv_command(argv), service_env(overrides), name))
        return started[-1]

    var = tmp_path_factory.mktemp("client") / "var"
    platform = Stack(launch, {"GPT2JOBS_VAR_DIR": str(var), "JOB_LEASE_SECONDS": LEASE_SECONDS})
    try:
        platform.migrate()
        platform.start_api()
        platform.start_worker("w1")
        yield platform
    finally:
        for process in started:
            process.stop()
        for process in started:
            if process.proc.returncode not in (0, None, -15):
                print(f"----- {process.name} (exit {process.proc.returncode}) -----\n{process.output()[-20000:]}")
