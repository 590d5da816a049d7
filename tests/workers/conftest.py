"""Worker fixtures: a Runtime on the session's database (SQLite and PostgreSQL) with its own artifact folder."""
import secrets
from collections.abc import Iterator

import pytest

from jobs.db import make_session_factory
from jobs.queue import make_celery
from jobs.settings import Settings
from jobs.storage import ArtifactStore
from workers.runtime import Runtime


@pytest.fixture
def rt(tmp_path, database_url, engine) -> Runtime:
    settings = Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path), "DATABASE_URL": database_url,
                                  "JOB_LEASE_SECONDS": "30"})
    return Runtime(settings, make_session_factory(engine), ArtifactStore(settings.artifact_dir),
                   make_celery(settings), worker_id=f"test:{secrets.token_hex(3)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def isolated_rt(request, tmp_path, fresh_database_url) -> Iterator[Runtime]:
    """A Runtime on a database of its own, for the sweeper, whose passes act on every job in the database."""
    from alembic import command

    from jobs.db import make_engine
    from tests.conftest import alembic_config

    url = fresh_database_url(request.param)
    command.upgrade(alembic_config(url), "head")
    settings = Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path), "DATABASE_URL": url, "JOB_LEASE_SECONDS": "30",
                                  "JOB_REDISPATCH_SECONDS": "30", "JOB_MAX_ATTEMPTS": "2"})
    engine = make_engine(url)
    yield Runtime(settings, make_session_factory(engine), ArtifactStore(settings.artifact_dir),
                  make_celery(settings), worker_id=f"test:{secrets.token_hex(3)}")
    engine.dispose()
