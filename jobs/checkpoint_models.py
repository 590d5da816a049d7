"""Any checkpoint as a model: register a training job's checkpoint (at any step, while the job runs, is paused,
or after it failed) as a model that generate and finetune jobs use at once.

A checkpoint directory already holds a Hugging Face GPT-2 checkpoint (config.json + model.safetensors; a LoRA
run's checkpoints hold the merged weights), so registering is torch-free: its files are hard-linked (copied across
file systems) into the model's folder, so the model outlives the checkpoint when retention deletes it later,
and checked with gpt2core.checkpoint as an import is. The model's id derives from the checkpoint's, so
registering a checkpoint again returns the model it already made.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gpt2core.checkpoint import CheckpointError, check_checkpoint
from jobs import repository
from jobs.db import session_scope
from jobs.errors import Conflict, InvalidRequest, NotFound
from jobs.models import NAME_LENGTH, Checkpoint, Job, Model
from jobs.specs import ModelShape, trained_model_name
from jobs.storage import ArtifactStore
from jobs.text import check_name

#: What a checkpoint directory holds besides the model: the trainer's state and a LoRA run's adapter files.
NOT_MODEL_FILES = ("trainer_state.pt", "adapter_model.safetensors", "adapter_config.json")


class CheckpointGone(Conflict):
    code = "checkpoint_gone"


def model_id_for_checkpoint(checkpoint_id: str) -> str:
    """"ckpt-<hex>" -> "model-<hex>"."""
    return "model-" + checkpoint_id.removeprefix("ckpt-")


def default_name(session: Session, job: Job, step: int) -> str:
    """"<the job's model name>@step-<step>", e.g. "gpt2-6x384:run1@step-300"."""
    params = job.params or {}
    if job.type == "finetune":
        base_model = session.get(Model, job.base_model_id) if job.base_model_id else None
        base = base_model.name if base_model is not None else str(params.get("model"))
    else:
        model = params.get("model", "gpt2")
        base = model if isinstance(model, str) else ModelShape.model_validate(model).name
    return f"{trained_model_name(base, params.get('suffix'), job.id)}@step-{step}"


def register_checkpoint(sessions: sessionmaker[Session], store: ArtifactStore, owner: str, job_id: str,
                        checkpoint_id: str, name: str | None = None) -> tuple[Model, bool]:
    """The model made from the job's checkpoint, and whether it was made now (False: registered before, also when
    retention has removed the checkpoint since).

    NotFound for a job or checkpoint that is not the caller's; InvalidRequest (422, param "name") for a bad name;
    Conflict for a name other than the one the checkpoint was registered under; CheckpointGone when retention
    removed the checkpoint's files meanwhile."""
    if name is not None:
        problem = check_name(name, "name", NAME_LENGTH)
        if problem or not name.strip():
            raise InvalidRequest(problem or "name must not be blank; leave it out for the default name",
                                 param="name", status=422)
    model_id = model_id_for_checkpoint(checkpoint_id)
    with session_scope(sessions) as session:
        job = repository.get_job(session, owner, job_id)
        existing = session.get(Model, model_id)
        if existing is not None and existing.owner == owner and existing.job_id == job.id:
            if name is not None and name != existing.name:
                raise Conflict(f"Checkpoint {checkpoint_id!r} is registered already, as model {existing.id} named "
                               f"{existing.name!r}; rename is not supported: leave the name out to get that model",
                               param="name")
            return existing, False
        checkpoint = session.scalars(
            select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id)).first()
        if checkpoint is None:
            raise NotFound("checkpoint", checkpoint_id)
        step, source = checkpoint.step, Path(checkpoint.storage_path)
        name = name if name is not None else default_name(session, job, step)
    staging = store.root / "tmp" / f"{model_id}.checkpoint"
    final = store.model_dir(model_id)
    try:
        link_model_files(source, staging)
        try:
            info = check_checkpoint(staging)
        except CheckpointError as exc:
            raise CheckpointGone(f"Checkpoint {checkpoint_id!r} cannot be loaded as a model: {exc}") from None
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        with session_scope(sessions) as session:
            try:
                with session.begin_nested():
                    model = repository.create_model(session, owner, name, "checkpoint", str(final), info.config,
                                                    info.parameter_count, job_id=job_id, model_id=model_id)
                    model.checkpoint_step = step
                    repository.add_event(session, job_id, f"Checkpoint at step {step} registered as model "
                                         f"{model_id} ({name})", data={"step": step, "model": model_id})
                return model, True
            except IntegrityError:  # a concurrent registration of the same checkpoint won
                winner = session.get(Model, model_id, populate_existing=True)
                if winner is None:
                    raise
                return winner, False
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        with session_scope(sessions) as session:
            if session.get(Model, model_id) is None:
                shutil.rmtree(final, ignore_errors=True)
        raise


def link_model_files(source: Path, target: Path) -> None:
    """Hard-link (or copy) the model files of checkpoint directory `source` into a new `target`; CheckpointGone
    when `source` is gone or incomplete."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    try:
        names = sorted(entry.name for entry in os.scandir(source) if entry.is_file(follow_symlinks=False))
        if "config.json" not in names:
            raise FileNotFoundError(source / "config.json")
        for name in names:
            if name in NOT_MODEL_FILES:
                continue
            try:
                os.link(source / name, target / name)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError):
                    raise
                shutil.copy2(source / name, target / name)  # another file system
    except FileNotFoundError:
        raise CheckpointGone("The checkpoint's files were removed (checkpoint retention keeps the last ones and "
                             "the best); register a checkpoint the job still lists.") from None
