"""Garbage collection (workers.cleanup.collect_garbage) on real files in a temporary artifact folder and real rows
on SQLite and PostgreSQL: what nothing refers to goes once the grace period has passed, what is referred to or
still being written stays, and the counts say what went."""
from __future__ import annotations

import io
import secrets
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select

from jobs import repository
from jobs.db import make_engine, make_session_factory, session_scope
from jobs.models import Checkpoint, File, Job, new_id
from jobs.queue import make_celery
from jobs.settings import Settings
from jobs.states import RUNNING, SUCCEEDED, transition
from jobs.storage import ArtifactStore
from tests.conftest import alembic_config
from workers.cleanup import GRACE_SECONDS, collect_garbage
from workers.runtime import Runtime
from workers.datasets import dataset_lock, locked, prepared

LATER = GRACE_SECONDS + 60  # seconds from now: everything written by the test is past its grace period
CORPUS = b"Once upon a time there was a tiny model. It learned to write.\n" * 200


def collect_later(rt: Runtime) -> dict[str, int]:
    return collect_garbage(rt, now=time.time() + LATER)


def nothing() -> dict[str, int]:
    return dict.fromkeys(("files", "models", "jobs", "checkpoints", "datasets", "staging"), 0)


def unique_text() -> bytes:
    return CORPUS + f"The end ({secrets.token_hex(8)}).\n".encode()


def upload(rt: Runtime, owner: str, content: bytes = CORPUS) -> File:
    file_id = new_id("file")
    blob = rt.artifacts.write_stream(rt.artifacts.file_path(file_id), io.BytesIO(content), 1 << 30)
    with session_scope(rt.sessions) as session:
        return repository.create_file(session, owner, "train", "corpus.txt", blob, 1, file_id=file_id)


def delete_file(rt: Runtime, owner: str, file: File) -> None:
    """What DELETE /v1/files/{id} does: the row, then the upload."""
    with session_scope(rt.sessions) as session:
        repository.delete_file(session, owner, file.id)
    rt.artifacts.delete(Path(file.storage_path))


def make_dir(path: Path, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {"data.bin": b"x" * 100}).items():
        (path / name).write_bytes(content)
    return path


def checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint folder as gpt2core writes it (trainer_state.pt marks it complete)."""
    return make_dir(folder / f"step-{step:06d}", {"config.json": b"{}", "model.safetensors": b"w" * 100,
                                                  "trainer_state.pt": b"s" * 100})


def new_job(rt: Runtime, owner: str, file_id: str, *statuses: str, keep: int | None = None) -> str:
    hyper = {"max_steps": 10} if keep is None else {"max_steps": 10, "keep_checkpoints": keep}
    with session_scope(rt.sessions) as session:
        job = repository.create_job(session, owner, "train", {"hyperparameters": hyper}, training_file_id=file_id)[0]
        for status in statuses:
            transition(job, status)
        return job.id


def record(rt: Runtime, job_id: str, step: int, val_loss: float | None, path: Path) -> None:
    with session_scope(rt.sessions) as session:
        session.add(Checkpoint(job_id=job_id, step=step, train_loss=1.0, val_loss=val_loss, storage_path=str(path),
                               bytes=300))


def recorded_steps(rt: Runtime, job_id: str) -> list[int]:
    with session_scope(rt.sessions) as session:
        return list(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def test_unreferenced_artifacts_go_after_the_grace_period_and_referenced_ones_stay(rt, owner):
    root = rt.artifacts.root
    kept_file = upload(rt, owner)
    orphan_upload = root / "files" / new_id("file")
    orphan_upload.write_bytes(b"a delete whose removal failed")
    upload_temp = root / "files" / f".{new_id('file')}.k2j3h4.tmp"
    upload_temp.write_bytes(b"an upload cut off")

    model_id = new_id("model")
    kept_model = make_dir(rt.artifacts.model_dir(model_id), {"config.json": b"{}"})
    with session_scope(rt.sessions) as session:
        repository.create_model(session, owner, "m", "import", str(kept_model), {}, 1, model_id=model_id)
    orphan_model = make_dir(rt.artifacts.model_dir(new_id("model")), {"config.json": b"{}"})
    model_staging = make_dir(root / "models" / f".{new_id('model')}.partial")
    import_scratch = make_dir(root / "tmp" / new_id("model"))
    import_archive = root / "tmp" / f"{new_id('model')}.upload"
    import_archive.write_bytes(b"archive")

    running = new_job(rt, owner, kept_file.id, RUNNING)
    kept_checkpoint = checkpoint(rt.artifacts.checkpoint_dir(running), 5)
    record(rt, running, 5, None, kept_checkpoint)
    unrecorded = checkpoint(rt.artifacts.checkpoint_dir(running), 10)  # a running job records it in a moment
    checkpoint_temp = make_dir(rt.artifacts.checkpoint_dir(running) / ".tmp-step-000015-0a1b2c3d")
    replaced = make_dir(rt.artifacts.checkpoint_dir(running) / ".old-step-000005-9f8e7d6c")
    orphan_job = checkpoint(rt.artifacts.checkpoint_dir(new_id("job")), 1).parents[1]

    untouched = [kept_file.storage_path, orphan_upload, upload_temp, kept_model, orphan_model, model_staging,
                 import_scratch, import_archive, kept_checkpoint, unrecorded, checkpoint_temp, replaced, orphan_job]
    assert collect_garbage(rt) == nothing()  # all of it was written just now: within the grace period
    assert all(Path(path).exists() for path in untouched)

    assert collect_later(rt) == {**nothing(), "files": 1, "models": 1, "jobs": 1, "staging": 6}
    gone = [orphan_upload, upload_temp, orphan_model, model_staging, import_scratch, import_archive, checkpoint_temp,
            replaced, orphan_job]
    assert [path for path in gone if path.exists()] == []
    assert all(Path(path).exists() for path in (kept_file.storage_path, kept_model, kept_checkpoint, unrecorded))
    assert collect_later(rt) == nothing()  # nothing more to do


def test_a_finished_job_keeps_what_its_retention_keeps(rt, owner):
    file = upload(rt, owner)
    finished = new_job(rt, owner, file.id, RUNNING, SUCCEEDED, keep=2)
    folder = rt.artifacts.checkpoint_dir(finished)
    losses = {100: 3.0, 200: 1.5, 300: 2.5, 400: 2.4, 500: 2.6}
    for step, loss in losses.items():
        record(rt, finished, step, loss, checkpoint(folder, step))
    stray = checkpoint(folder, 600)  # written by a worker that had lost the job: never recorded

    assert collect_later(rt) == {**nothing(), "checkpoints": 3}
    assert recorded_steps(rt, finished) == [200, 400, 500]  # the last 2 and the best (step 200)
    assert sorted(path.name for path in folder.iterdir()) == ["step-000200", "step-000400", "step-000500"]
    assert not stray.exists()
    with session_scope(rt.sessions) as session:
        assert [c.step for c in repository.list_checkpoints(session, owner, finished)] == [200, 400, 500]


def test_a_dataset_goes_when_no_file_has_its_content(rt, owner):
    text = unique_text()  # the database is shared: content no other test uploads
    first, second = upload(rt, owner, text), upload(rt, owner, text)  # the same content: one dataset cache
    other = upload(rt, owner, unique_text())
    for file in (first, second, other):
        prepared(rt, file, 0.05)
        prepared(rt, file, 0.0)
    datasets = rt.artifacts.root / "datasets"
    caches = sorted(path.name for path in datasets.iterdir() if path.is_dir())
    assert len(caches) == 4 and sum(name.startswith(first.sha256) for name in caches) == 2

    delete_file(rt, owner, first)
    assert collect_later(rt) == nothing()  # the second file still has that content: a job may use it

    delete_file(rt, owner, second)
    assert collect_later(rt) == {**nothing(), "datasets": 2}
    others = [name for name in caches if name.startswith(other.sha256)]
    assert sorted(path.name for path in datasets.iterdir()) == sorted(others + [dataset_lock(datasets / others[0]).name])
    again = upload(rt, owner, text)  # the same content uploaded again is prepared anew
    assert prepared(rt, again, 0.05).train.size > 0


def test_a_dataset_in_use_is_left_alone(rt, owner):
    file = upload(rt, owner, unique_text())
    prepared(rt, file, 0.05)
    delete_file(rt, owner, file)
    cache = next(path for path in (rt.artifacts.root / "datasets").iterdir() if path.is_dir())
    with locked(dataset_lock(cache)):  # a job preparing or loading it right now
        assert collect_later(rt)["datasets"] == 0
    assert cache.is_dir()
    assert collect_later(rt)["datasets"] == 1 and not cache.exists()


def test_a_job_waiting_on_a_dataset_lock_that_is_collected_takes_the_new_lock(rt, owner):
    lock = rt.artifacts.root / "datasets" / f"{'0' * 64}-gpt2-v1-val0.lock"
    entered = threading.Event()

    def job_preparing_it() -> None:
        with locked(lock):
            entered.set()

    with locked(lock):
        waiter = threading.Thread(target=job_preparing_it)
        waiter.start()
        time.sleep(0.2)
        assert not entered.is_set()
        lock.unlink()  # what the collector does while holding it
    waiter.join(5)
    assert entered.is_set() and lock.exists()  # the waiter locked a new file at the same path


def test_a_worker_on_an_empty_database_removes_only_leftovers(tmp_path, fresh_database_url):
    url = fresh_database_url("sqlite")
    command.upgrade(alembic_config(url), "head")
    settings = Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path), "DATABASE_URL": url})
    engine = make_engine(url)
    rt = Runtime(settings, make_session_factory(engine), ArtifactStore(settings.artifact_dir), make_celery(settings),
                 worker_id=f"test:{secrets.token_hex(3)}")
    try:
        upload_ = rt.artifacts.file_path(new_id("file"))
        upload_.parent.mkdir(parents=True)
        upload_.write_bytes(b"someone's data")
        model = make_dir(rt.artifacts.model_dir(new_id("model")))
        temp = rt.artifacts.root / "files" / f".{new_id('file')}.x.tmp"
        temp.write_bytes(b"cut off")
        assert collect_later(rt) == {**nothing(), "staging": 1}
        assert upload_.exists() and model.exists() and not temp.exists()
    finally:
        engine.dispose()


def test_a_job_row_keeps_its_folder(rt, owner):
    job_id = new_job(rt, owner, upload(rt, owner).id)
    folder = rt.artifacts.job_dir(job_id)
    make_dir(folder / "checkpoints")
    assert collect_later(rt)["jobs"] == 0 and folder.is_dir()
    with session_scope(rt.sessions) as session:
        session.delete(session.get(Job, job_id))
    assert collect_later(rt)["jobs"] == 1 and not folder.exists()


@pytest.mark.parametrize("missing", ["root", "folders"])
def test_nothing_to_collect_is_fine(rt, missing):
    if missing == "folders":
        rt.artifacts.root.mkdir(parents=True)
    assert collect_later(rt) == nothing()
