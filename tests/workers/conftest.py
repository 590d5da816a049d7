"""Worker fixtures: a Runtime on the session's database (SQLite and PostgreSQL) with its own artifact folder."""
import secrets

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
