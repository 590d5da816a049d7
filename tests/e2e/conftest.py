"""The platform as processes: the commands docker-compose.yml gives its services (migrate, api, worker), run
against PostgreSQL and Redis or the embedded default (SQLite and the filesystem broker)."""
from __future__ import annotations

import shlex
import subprocess
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from demo.local import free_port
from tests.conftest import REPO_ROOT, ServiceProcess, service_env, venv_command

HEALTHZ_TIMEOUT = 60
WORKER_READY_TIMEOUT = 120
#: Short leases, so a killed worker's job is taken over within seconds.
LEASE_SECONDS = "4"


def compose_command(service: str) -> list[str]:
    command = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"][service]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def replace_option(argv: list[str], name: str, value: str) -> list[str]:
    position = argv.index(name)
    return [*argv[: position + 1], value, *argv[position + 2:]]


class Api(requests.Session):
    """An HTTP client for one running API: relative paths, an API key, JSON errors raised with their body."""

    def __init__(self, base_url: str, key: str | None = None):
        super().__init__()
        self.base_url = base_url
        if key is not None:
            self.headers["Authorization"] = f"Bearer {key}"

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return super().request(method, self.base_url + url, *args, **kwargs)


class Stack:
    """One platform deployment under test: its settings, and the services started for it."""

    def __init__(self, launch: Callable[..., ServiceProcess], environment: dict[str, str]):
        self.launch = launch
        self.environment = environment
        self.api_url: str | None = None
        self.workers: list[ServiceProcess] = []  # started by start_worker, in order

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        """A one-shot command in the stack's environment; its output is in the assertion message if it fails."""
        done = subprocess.run(venv_command(argv), cwd=REPO_ROOT, env=service_env(self.environment),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def migrate(self) -> None:
        self.run(compose_command("migrate"))

    def create_key(self, owner: str) -> str:
        """`flask --app api keys create --owner NAME`: the key is the last line it prints."""
        return self.run(["flask", "--app", "api", "keys", "create", "--owner", owner]).stdout.strip().splitlines()[-1]

    def start_api(self, port: int | None = None) -> ServiceProcess:
        port = port or free_port()
        argv = replace_option(compose_command("api"), "--bind", f"127.0.0.1:{port}")
        api = self.launch(argv, self.environment, "api")
        self.api_url = f"http://127.0.0.1:{port}"
        assert api.wait_for("Booting worker", HEALTHZ_TIMEOUT), api.output()
        probe = Api(self.api_url)
        for _ in range(HEALTHZ_TIMEOUT * 10):
            try:
                if probe.get("/healthz", timeout=2).status_code == 200:
                    return api
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy booting to answer
                pass
            assert api.proc.poll() is None, api.output()
            api.wait_for("\0", 0.1)
        raise AssertionError(f"the API never answered /healthz:\n{api.output()}")

    def start_worker(self, name: str, queues: str | None = None) -> ServiceProcess:
        """docker-compose's worker command, with a node name of its own (and other queues, if given)."""
        argv = [*compose_command("worker"), "--hostname", f"{name}@%h"]
        if queues is not None:
            argv += ["--queues", queues]
        worker = self.launch(argv, self.environment, name)
        assert worker.wait_for("worker ready", WORKER_READY_TIMEOUT), worker.output()
        self.workers.append(worker)
        return worker

    def client(self, owner: str) -> Api:
        assert self.api_url is not None, "start_api() first"
        return Api(self.api_url, self.create_key(owner))


@contextmanager
def module_stack(tmp_path_factory, name: str, environment: dict[str, str] | None = None) -> Iterator[Stack]:
    """A stack for a whole test module: gunicorn and a celery worker on the embedded default (SQLite and the
    filesystem broker), stopped at the end; a process that died on its own has its output printed."""
    started: list[ServiceProcess] = []

    def launch(argv: list[str], overrides: dict[str, str], label: str) -> ServiceProcess:
        started.append(ServiceProcess(venv_command(argv), service_env(overrides), label))
        return started[-1]

    var = tmp_path_factory.mktemp(name) / "var"
    platform = Stack(launch, {"GPT2JOBS_VAR_DIR": str(var), "JOB_LEASE_SECONDS": LEASE_SECONDS, **(environment or {})})
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


@pytest.fixture
def redis_stack(fresh_database_url, redis_url, tmp_path, launch) -> Iterator[Stack]:
    """Production-shaped: PostgreSQL (a fresh database), Redis (the session's database), artifacts on disk.
    (`launch` comes last so its processes stop before the database is dropped.)"""
    yield Stack(launch, {"DATABASE_URL": fresh_database_url("postgresql"), "BROKER_URL": redis_url,
                         "ARTIFACT_DIR": str(tmp_path / "artifacts"), "GPT2JOBS_VAR_DIR": str(tmp_path / "var"),
                         "JOB_LEASE_SECONDS": LEASE_SECONDS, "GENERATION_SHARD_SIZE": "20"})


@pytest.fixture
def embedded_stack(launch, tmp_path) -> Iterator[Stack]:
    """The embedded default: nothing set but the var folder (SQLite and the filesystem broker inside it)."""
    yield Stack(launch, {"GPT2JOBS_VAR_DIR": str(tmp_path / "var"), "JOB_LEASE_SECONDS": LEASE_SECONDS})


def corpus_file(tmp_path: Path, size: int = 20_000) -> Path:
    """A training text: the start of the English text that ships with Python."""
    from pydoc_data.topics import topics

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(topics.values())[:size])
    return path
