"""Shared fixtures.

Database fixtures: every database test runs on SQLite and on PostgreSQL. PostgreSQL gets one fresh database per
test session (created with createdb, dropped at the end); its tests are skipped only when the server does not
answer pg_isready. The schema always comes from `alembic upgrade head`. Tests share that database, so each one
works under its own random owner.
"""
from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

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
