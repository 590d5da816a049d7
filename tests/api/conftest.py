import pytest

from api import create_app
from jobs.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path)})


@pytest.fixture
def app(settings):
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()
