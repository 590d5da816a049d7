"""API fixtures: a real app on the session's database (SQLite and PostgreSQL), keys for two owners."""
import secrets

import pytest

from api import create_app
from jobs import repository
from jobs.db import session_scope
from jobs.settings import Settings


@pytest.fixture
def settings(tmp_path, database_url, engine) -> Settings:
    """Settings on the migrated test database; the broker is a filesystem folder under tmp_path."""
    return Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path), "DATABASE_URL": database_url})


@pytest.fixture
def app(settings):
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    app.extensions["gpt2jobs"].engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


def new_key(app, owner: str) -> dict[str, str]:
    with session_scope(app.extensions["gpt2jobs"].sessions) as session:
        _, secret = repository.create_api_key(session, owner)
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def auth(app) -> dict[str, str]:
    """Headers with a key of a fresh owner."""
    return new_key(app, f"owner-{secrets.token_hex(6)}")


@pytest.fixture
def other_auth(app) -> dict[str, str]:
    """Headers with a key of a different owner."""
    return new_key(app, f"other-{secrets.token_hex(6)}")
