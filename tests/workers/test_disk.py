"""Disk stays bounded, and a full disk is a clear failure: checkpoint retention in a real training run, a full disk
(a real tmpfs, where mounting one is permitted) while a job writes a checkpoint or its trained model, and no files
left behind by a model registration that failed. Real jobs run in-process on SQLite and PostgreSQL."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from sqlalchemy import select

from gpt2core import GPT2, GPT2Config
from gpt2core.train import list_checkpoints
from jobs import execution, repository
from jobs.db import session_scope
from jobs.errors import NotFound
from jobs.models import Job, Model, new_id
from jobs.specs import JOB_SPEC
from workers.runtime import Runtime, error_for
from workers.training import register_model, run_training
from tests.workers.test_worker_runs import CORPUS, HYPER, TINY, events, job, train_job, upload


def checkpoint_steps(rt: Runtime, owner: str, job_id: str) -> list[int]:
    """What GET /v1/jobs/{id}/checkpoints lists."""
    with session_scope(rt.sessions) as session:
        return [c.step for c in repository.list_checkpoints(session, owner, job_id)]


def test_training_keeps_its_last_checkpoints_and_the_best_one(rt, owner):
    # Trained on one repeated sentence, the model gets worse on English text at every step: the best checkpoint
    # by validation loss is an early one, far from the last two.
    training = upload(rt, owner, b"the cat sat on the mat. " * 400)
    validation = upload(rt, owner, CORPUS, name="english.txt")
    hyper = {**HYPER, "learning_rate": 3e-2, "eval_every": 1, "checkpoint_every": 1, "sample_every": 0,
             "keep_checkpoints": 2}
    with session_scope(rt.sessions) as session:
        job_id = repository.create_job(session, owner, "train", {"model": TINY, "hyperparameters": hyper, "seed": 1},
                                       training_file_id=training, validation_file_id=validation)[0].id
    run_training(rt, job_id)
    assert job(rt, job_id).status == "succeeded"
    val_loss = {e.data["step"]: e.data["val_loss"] for e in events(rt, job_id) if e.data and "val_loss" in e.data}
    assert sorted(val_loss) == [1, 2, 3, 4, 5, 6]
    best = min(val_loss, key=lambda step: (val_loss[step], -step))
    assert best < 5, f"the premise changed: validation losses {val_loss}"
    folder = rt.artifacts.checkpoint_dir(job_id)
    assert checkpoint_steps(rt, owner, job_id) == [best, 5, 6]
    assert [step for step, _ in list_checkpoints(folder)] == [best, 5, 6]
    assert sorted(os.listdir(folder)) == [f"step-{step:06d}" for step in (best, 5, 6)]  # nothing else stays


def test_retention_defaults_to_the_setting(rt, owner):
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS), checkpoint_every=1, eval_every=0, sample_every=0)
    run_training(rt, job_id)  # no keep_checkpoints in the job: KEEP_CHECKPOINTS (3), no validation loss
    assert checkpoint_steps(rt, owner, job_id) == [4, 5, 6]
    assert [step for step, _ in list_checkpoints(rt.artifacts.checkpoint_dir(job_id))] == [4, 5, 6]


def test_a_full_disk_while_writing_a_checkpoint_fails_the_job_and_keeps_the_last_complete_one(rt, owner, tiny_disk):
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS), sample_every=0)  # checkpoints at steps 3 and 6
    folder = tiny_disk(rt.artifacts.job_dir(job_id), "30m")  # a checkpoint of TINY takes 19.5 MB: one fits
    run_training(rt, job_id)
    failed = job(rt, job_id)
    assert failed.status == "failed" and failed.result is None
    assert failed.error["code"] == "disk_full" and failed.error["param"] is None
    message = failed.error["message"]
    assert "writing the checkpoint at step 6 failed (No space left on device)" in message
    assert "last complete checkpoint (step 3) is kept" in message and "free disk space" in message
    assert str(rt.artifacts.root) not in message and "<server path>" not in message
    assert any(e.level == "error" and e.data and e.data.get("code") == "disk_full" for e in events(rt, job_id))
    assert checkpoint_steps(rt, owner, job_id) == [3]
    assert os.listdir(folder / "checkpoints") == ["step-000003"]  # the partial step-6 checkpoint is gone
    with session_scope(rt.sessions) as session:
        assert session.get(Model, execution.model_id_for_job(job_id)) is None


def test_a_full_disk_while_saving_the_trained_model_leaves_no_model_files(rt, owner, tiny_disk):
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS), sample_every=0)
    models = tiny_disk(rt.artifacts.root / "models", "4m")  # TINY's model.safetensors takes 6.5 MB
    run_training(rt, job_id)
    failed = job(rt, job_id)
    assert failed.status == "failed" and failed.error["code"] == "disk_full"
    assert "writing the trained model failed" in failed.error["message"]
    assert "last complete checkpoint (step 6) is kept" in failed.error["message"]
    assert os.listdir(models) == []  # neither the staging folder nor a model folder
    with session_scope(rt.sessions) as session:
        assert session.get(Model, execution.model_id_for_job(job_id)) is None
    assert checkpoint_steps(rt, owner, job_id) == [3, 6]


def spec_and_model():
    spec = JOB_SPEC.validate_python({"type": "train", "training_file": "file-x", "model": TINY, "seed": 1})
    torch.manual_seed(0)
    return spec, GPT2(GPT2Config(**TINY))


def test_a_model_registration_that_fails_leaves_no_files(rt, owner):
    spec, model = spec_and_model()
    gone = Job(id=new_id("job"), owner=owner, type="train")  # its row was deleted: registering it fails
    with pytest.raises(NotFound):
        register_model(rt, gone, spec, model, "gpt2-1x32")
    assert os.listdir(rt.artifacts.root / "models") == []


def test_registering_again_after_a_committed_registration_rewrites_nothing(rt, owner):
    spec, model = spec_and_model()
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS))
    first = register_model(rt, job(rt, job_id), spec, model, "gpt2-1x32")
    weights = rt.artifacts.model_dir(first) / "model.safetensors"
    written = weights.stat()
    assert register_model(rt, job(rt, job_id), spec, model, "gpt2-1x32") == first  # a retried worker
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    with session_scope(rt.sessions) as session:
        assert session.scalars(select(Model.id).where(Model.job_id == job_id)).all() == [first]


def test_any_full_disk_error_gets_the_disk_full_code_without_server_paths():
    error = error_for(OSError(errno.ENOSPC, "No space left on device", "/srv/artifacts/jobs/x"), "job-test")
    assert error["code"] == "disk_full" and "/srv" not in error["message"] and "free disk space" in error["message"]
    quota = RuntimeError("file write failed")
    quota.__context__ = OSError(errno.EDQUOT, "Disk quota exceeded")  # how torch.save reports it
    assert error_for(quota, "job-test")["code"] == "disk_full"
    assert error_for(OSError(errno.EACCES, "Permission denied"), "job-test")["code"] == "internal_error"
