"""API fixtures: a real app on the session's database (SQLite and PostgreSQL), keys for two owners."""
import base64
import io
import json
import secrets

import pytest

from api import create_app
from jobs import repository
from jobs.db import session_scope
from jobs.models import Checkpoint, GenerationResult, Job, new_id
from jobs.settings import Settings
from jobs.states import transition


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


# Helpers shared by the files, jobs and tenancy tests: apps with other settings, uploads, submissions, rows
# inserted the way a worker would, and a look inside the filesystem broker.

TRAIN_TEXT = ("Once upon a time there was a tiny model.\nIt learned to write.\n" * 80).encode()  # > 1024 tokens
GENERATE_JSONL = b'{"custom_id": "a", "prompt": "Hello"}\n{"custom_id": "b", "prompt": "Bye", "sampling": {"n": 2}}\n'


@pytest.fixture
def make_app(tmp_path, database_url, engine):
    """`make_app(**env)`: another app on the same database, artifact folder and broker folder as `app`, with
    extra environment variables (MAX_UPLOAD_BYTES=64, BROKER_URL=..., DATABASE_URL=...)."""
    made = []

    def make(**env):
        environ = {"GPT2JOBS_VAR_DIR": str(tmp_path), "DATABASE_URL": database_url}
        environ.update({name: str(value) for name, value in env.items()})
        app = create_app(Settings.from_env(environ))
        app.config["TESTING"] = True
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["gpt2jobs"].engine.dispose()


@pytest.fixture
def offline_database_app(tmp_path):
    """An app whose database cannot be reached (nothing listens on port 1); independent of the test database."""
    settings = Settings.from_env(
        {"GPT2JOBS_VAR_DIR": str(tmp_path), "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    )
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    app.extensions["gpt2jobs"].engine.dispose()


class ApiHelper:
    """Drives one app through its API (asserting the happy path's status) and reaches behind it where a test
    needs state only a worker would create."""

    def __init__(self, app, client):
        self.app, self.client = app, client
        self.platform = app.extensions["gpt2jobs"]

    def session(self):
        return session_scope(self.platform.sessions)

    def owner_of(self, headers: dict[str, str]) -> str:
        with self.session() as session:
            return repository.authenticate(session, headers["Authorization"].split(" ", 1)[1])

    # Files

    def upload(self, headers, content: bytes = TRAIN_TEXT, filename: str = "train.txt", purpose: str | None = "train"):
        data = {"file": (io.BytesIO(content), filename)}
        if purpose is not None:
            data["purpose"] = purpose
        return self.client.post("/v1/files", data=data, headers=headers, content_type="multipart/form-data")

    def upload_file(self, headers, content: bytes = TRAIN_TEXT, filename: str = "train.txt",
                    purpose: str = "train") -> dict:
        response = self.upload(headers, content, filename, purpose)
        assert response.status_code == 201, response.json
        return response.json

    def generation_file(self, headers, content: bytes = GENERATE_JSONL) -> dict:
        return self.upload_file(headers, content, "prompts.jsonl", "generate")

    # Models

    def create_model(self, headers, name: str = "tiny") -> str:
        """A registered model owned by `headers`' owner, with a (placeholder) folder so it can be downloaded."""
        model_id = new_id("model")
        folder = self.platform.artifacts.model_dir(model_id)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_head": 2}))
        with self.session() as session:
            repository.create_model(session, self.owner_of(headers), name, "import", str(folder),
                                    {"model_type": "gpt2"}, 1000, model_id=model_id)
        return model_id

    # Jobs

    def submit(self, headers, body, **extra_headers):
        return self.client.post("/v1/jobs", data=json.dumps(body), content_type="application/json",
                                headers={**headers, **extra_headers})

    def submit_job(self, headers, body, **extra_headers) -> dict:
        response = self.submit(headers, body, **extra_headers)
        assert response.status_code == 202, response.json
        return response.json

    def train_job(self, headers, **fields) -> dict:
        file_id = fields.pop("training_file", None) or self.upload_file(headers)["id"]
        return self.submit_job(headers, {"type": "train", "training_file": file_id, **fields})

    def generate_job(self, headers, prompts=("Hello", "Bye"), **fields) -> dict:
        model_id = fields.pop("model", None) or self.create_model(headers)
        return self.submit_job(headers, {"type": "generate", "model": model_id, "prompts": list(prompts), **fields})

    def set_status(self, job_id: str, *statuses: str) -> None:
        """Move a job through `statuses` as a worker would (each step must be a legal transition)."""
        with self.session() as session:
            job = session.get(Job, job_id)
            for status in statuses:
                transition(job, status)

    def add_events(self, job_id: str, messages) -> list[int]:
        with self.session() as session:
            return [repository.add_event(session, job_id, message).id for message in messages]

    def add_checkpoints(self, job_id: str, steps) -> list[str]:
        """Checkpoint rows (their files do not exist); returns their ids."""
        with self.session() as session:
            rows = [Checkpoint(job_id=job_id, step=step, train_loss=10.0 / step, val_loss=None,
                               storage_path=f"/checkpoints/{job_id}/{step}", bytes=1000 + step) for step in steps]
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def add_metrics(self, job_id: str, steps) -> list[dict]:
        """Per-step training metric rows as a worker writes them (val_loss on every third step); returns them."""
        from jobs.training_metrics import upsert_metrics

        rows = [{"step": step, "train_loss": 10.0 / step, "val_loss": 9.0 / step if step % 3 == 0 else None,
                 "learning_rate": 3e-3, "grad_norm": 1.0 + step / 8, "tokens_per_second": 5400.0 + step,
                 "elapsed_seconds": 0.5 * step} for step in steps]
        with self.session() as session:
            upsert_metrics(session, job_id, rows)
        return rows

    def add_results(self, job_id: str, indexes) -> None:
        """Generation results in the order given (a worker may finish prompts out of order)."""
        with self.session() as session:
            for index in indexes:
                session.add(GenerationResult(
                    job_id=job_id, index=index, custom_id=f"c{index}", prompt=f"prompt {index}",
                    completions=[{"text": f" completion {index}", "finish_reason": "length"}],
                    usage={"prompt_tokens": 2, "completion_tokens": 3}, error=None,
                ))

    # What is stored

    def broker_messages(self) -> list[dict]:
        """The messages waiting in the filesystem broker: task name, args and queue (routing key) of each."""
        folder = self.platform.settings.broker_folder / "messages"
        messages = []
        for path in sorted(folder.glob("*.msg")):
            raw = json.loads(path.read_text())
            body = raw["body"]
            if raw["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args, _kwargs, _embed = json.loads(body)
            messages.append({"task": raw["headers"]["task"], "args": args,
                             "queue": raw["properties"]["delivery_info"]["routing_key"]})
        return messages

    def artifact_files(self) -> list[str]:
        root = self.platform.artifacts.root
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def walk(self, url: str, headers, limit: int, **filters) -> list[dict]:
        """Every page of a list route, following `after` cursors; checks each page's own bookkeeping."""
        pages, after = [], None
        while True:
            query = {**filters, "limit": limit, **({"after": after} if after is not None else {})}
            response = self.client.get(url, query_string=query, headers=headers)
            assert response.status_code == 200, response.json
            body = response.json
            ids = [item["id"] for item in body["data"]]
            assert body["object"] == "list" and len(ids) <= limit
            assert (body["first_id"], body["last_id"]) == ((ids[0], ids[-1]) if ids else (None, None))
            pages.append(body)
            if not body["has_more"]:
                return pages
            assert len(ids) == limit
            after = body["last_id"]


@pytest.fixture
def helper(app, client) -> ApiHelper:
    return ApiHelper(app, client)
