"""Shared fixtures.

Database fixtures: every database test runs on SQLite and on PostgreSQL. PostgreSQL gets one fresh database per
test session (created with createdb, dropped at the end); its tests are skipped only when the server does not
answer pg_isready. The schema always comes from `alembic upgrade head`. Tests share that database, so each one
works under its own random owner.
"""
from __future__ import annotations

import base64
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from demo.local import console_script
from gpt2core import GPT2, GPT2Config, GPT2Tokenizer
from jobs.db import make_engine, make_session_factory

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", "5432", "postgres"


def alembic_config(database_url: str) -> Config:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def postgres_answers() -> bool:
    return shutil.which("pg_isready") is not None and subprocess.run(
        ["pg_isready", "-q", "-h", PG_HOST, "-p", PG_PORT], check=False
    ).returncode == 0


def create_postgres_database(prefix: str) -> str:
    name = f"{prefix}_{secrets.token_hex(6)}"
    subprocess.run(["createdb", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, name], check=True)
    return name


def drop_postgres_database(name: str) -> None:
    subprocess.run(
        ["dropdb", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, "--if-exists", "--force", name], check=True
    )


def postgres_url(name: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


@pytest.fixture(scope="session")
def postgres_database_url() -> Iterator[str]:
    if not postgres_answers():
        pytest.skip(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT}")
    name = create_postgres_database("gpt2jobs_test")
    yield postgres_url(name)
    drop_postgres_database(name)


@pytest.fixture
def fresh_database_url(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """A factory for an empty database of the given backend ("sqlite" or "postgresql"), dropped afterwards."""
    created: list[str] = []

    def make(backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / f'fresh-{secrets.token_hex(4)}.db'}"
        if not postgres_answers():
            pytest.skip(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT}")
        created.append(create_postgres_database("gpt2jobs_fresh"))
        return postgres_url(created[-1])

    yield make
    for name in created:
        drop_postgres_database(name)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'gpt2jobs.db'}"
    return request.getfixturevalue("postgres_database_url")


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    command.upgrade(alembic_config(database_url), "head")
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def migrations_config() -> Callable[[str], Config]:
    return alembic_config


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def owner() -> str:
    return f"owner-{secrets.token_hex(6)}"


@pytest.fixture
def other_owner() -> str:
    return f"other-{secrets.token_hex(6)}"

# Redis: each test session claims a database 1..15 nobody else holds (a key set with NX in it) and deletes only
# its own keys there, so concurrent runs never share state.

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_CLAIM_KEY = "gpt2jobs-tests:claim"


def clear_redis(client: redis.Redis) -> None:
    keys = [k for k in client.scan_iter(count=1000) if k != REDIS_CLAIM_KEY.encode()]
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """A Redis database number claimed for this session; its keys (ours only) are deleted afterwards."""
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.skip(f"Redis not running at {REDIS_HOST}:{REDIS_PORT}: {exc}")
    token = uuid.uuid4().hex
    dbs = list(range(1, 16))
    random.shuffle(dbs)
    for db in dbs:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        if client.set(REDIS_CLAIM_KEY, token, nx=True, ex=3600):
            break
    else:
        pytest.skip("no free Redis database 1..15 to claim")
    try:
        yield db
    finally:
        clear_redis(client)
        if client.get(REDIS_CLAIM_KEY) == token.encode():
            client.delete(REDIS_CLAIM_KEY)


@pytest.fixture
def redis_client(redis_db: int) -> Iterator[redis.Redis]:
    """A client on the session's Redis database, emptied before and after the test."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
    clear_redis(client)
    yield client
    clear_redis(client)


@pytest.fixture
def redis_url(redis_db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"


@pytest.fixture
def queued_messages(redis_client: redis.Redis) -> Callable[[str], list[tuple[dict, list]]]:
    """`queued_messages(queue)`: the Celery messages waiting in a Redis queue, oldest first, as (headers, args)."""

    def read(queue: str) -> list[tuple[dict, list]]:
        decoded = []
        for raw in reversed(redis_client.lrange(queue, 0, -1)):  # kombu LPUSHes, workers BRPOP
            message = json.loads(raw)
            body = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args, _kwargs, _embed = json.loads(body)
            decoded.append((message["headers"], args))
        return decoded

    return read


# Real processes (gunicorn, celery, alembic, flask) for end-to-end tests.


class ServiceProcess:
    """A child process in its own session whose merged output is collected on a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str):
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line)

    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for(self, needle: str, timeout: float) -> bool:
        """Whether `needle` shows up in the output within `timeout` seconds (False early if the process exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output():
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)
                return needle in self.output()
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of the whole process group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill_group()

    def kill(self) -> None:
        """SIGKILL to the process and every child it started: a machine losing power, for this process."""
        self.kill_group()
        self.proc.wait(timeout=30)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def service_env(overrides: dict[str, str]) -> dict[str, str]:
    """This environment without the platform's settings, plus `overrides`; CPU only, unbuffered output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "DATABASE_URL", "ARTIFACT_DIR", "GPT2JOBS_VAR_DIR")}
    env.update({"PYTHONUNBUFFERED": "1", "GPT2CORE_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    env.update(overrides)
    return env


def venv_command(argv: list[str]) -> list[str]:
    """A console-script command (gunicorn, celery, alembic, flask) run from this interpreter's environment."""
    return [console_script(argv[0]), *argv[1:]]


@pytest.fixture
def launch() -> Iterator[Callable[..., ServiceProcess]]:
    """Start a ServiceProcess (`launch(argv, env_overrides, name)`); every one is stopped after the test, and
    the output of any that failed is printed."""
    started: list[ServiceProcess] = []

    def start(argv: list[str], overrides: dict[str, str], name: str) -> ServiceProcess:
        started.append(ServiceProcess(venv_command(argv), service_env(overrides), name))
        return started[-1]

    yield start
    for process in started:
        process.stop()
    for process in started:
        print(f"----- {process.name} (exit {process.proc.returncode}) -----\n{process.output()[-20000:]}")


@pytest.fixture(scope="session")
def tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture
def tiny_config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=128)


@pytest.fixture
def tiny_model(tiny_config) -> GPT2:
    torch.manual_seed(0)
    return GPT2(tiny_config).eval()


# A real full disk: a tiny tmpfs mounted on a folder (needs root or CAP_SYS_ADMIN; tests that use it are skipped
# where mounting is not permitted).


@pytest.fixture
def tiny_disk() -> Iterator[Callable[[Path, str], Path]]:
    """`tiny_disk(folder, "2m")`: mounts a tmpfs of that size on `folder` (created if missing) for this test."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)
