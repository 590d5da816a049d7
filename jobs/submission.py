"""Submitting a job: resolve its specification, check it against what it references, store it (one transaction).

Everything a job will need is checked here, at the door, so an accepted job is one its worker can run: the
referenced files and model exist, belong to the caller and are locked against a concurrent delete until the job
is stored; a fine-tune's model name fits its column; the training file gives more tokens than the model's context;
a generation's max_new_tokens fits the model's context.
Settings that cannot take effect as asked become warning events on the job.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

# Torch-free parts of gpt2core (see README, Layout): the presets' shapes and transformers' config defaults.
from gpt2core.checkpoint.common import CONFIG_DEFAULTS
from gpt2core.config import GPT2Config

from jobs import repository
from jobs.errors import InvalidRequest
from jobs.models import NAME_LENGTH, File, Job, Model
from jobs.readers import HELD_OUT_FRACTION, training_tokens
from jobs.specs import PERIODIC, AnySpec, FinetuneSpec, GenerateSpec, ModelShape, TrainSpec, resolve, stored_params
from jobs.text import check_name


def submit_job(session: Session, owner: str, spec: AnySpec, *, max_inline_prompts: int,
               keep_checkpoints: int | None = None, idempotency_key: str | None = None,
               request_hash: str | None = None) -> tuple[Job, bool]:
    """The stored job and whether it is new (enqueue only then). InvalidRequest/Conflict as repository.create_job,
    and InvalidRequest naming the field for a job its worker could not run. `keep_checkpoints` (the server's
    KEEP_CHECKPOINTS) is stored as a training job's hyperparameters.keep_checkpoints when the job gives none."""
    if isinstance(spec, GenerateSpec) and spec.prompts is not None and len(spec.prompts) > max_inline_prompts:
        raise InvalidRequest(f"prompts: at most {max_inline_prompts} inline prompts; upload an input_file for more",
                             param="prompts")
    spec = resolve(spec, keep_checkpoints=keep_checkpoints)
    refs: dict[str, str | None] = {}
    if isinstance(spec, TrainSpec):
        refs = {"training_file_id": spec.training_file, "validation_file_id": spec.validation_file}
        if isinstance(spec, FinetuneSpec):
            refs["base_model_id"] = spec.model
    else:
        refs = {"input_file_id": spec.input_file, "base_model_id": spec.model}
    job, created = repository.create_job(
        session, owner, spec.type, stored_params(spec), **refs, metadata=spec.metadata,
        idempotency_key=idempotency_key, request_hash=request_hash,
        devices=spec.devices if isinstance(spec, TrainSpec) else 1,
    )
    if created:
        model = session.get(Model, job.base_model_id) if job.base_model_id else None
        check_runnable(session, spec, job, model)
        job.progress = job.progress or initial_progress(spec)
        for message in warnings(spec):
            repository.add_event(session, job.id, message, level="warning")
    return job, created


def check_runnable(session: Session, spec: AnySpec, job: Job, model: Model | None) -> None:
    """InvalidRequest naming the field when the job, as specified, could not run to the end on `model`."""
    if isinstance(spec, TrainSpec):
        base = model.name if model is not None else (spec.model if isinstance(spec.model, str) else spec.model.name)
        name = spec.model_name(base, job.id)
        if check_name(name, "the model name", NAME_LENGTH):
            param = "suffix" if spec.suffix else "model"
            raise InvalidRequest(
                f"{param}: the trained model would be named {base[:20]!r}...:{name.rsplit(':', 1)[1]!r}, "
                f"{len(name)} characters, over the limit of {NAME_LENGTH}; choose a shorter suffix (the base "
                f"model's name is {len(base)} characters)", param=param)
    if isinstance(spec, TrainSpec):
        file = session.get(File, job.training_file_id) if job.training_file_id else None
        block_size = (model_context(model) if model is not None else
                      spec.model.block_size if isinstance(spec.model, ModelShape) else
                      GPT2Config.preset(spec.model).block_size)
        held_out = spec.validation_file is None
        if file is not None and file.tokens is not None:
            train_tokens = training_tokens(file.tokens, held_out)
            if train_tokens <= block_size:
                held = f" after the {HELD_OUT_FRACTION:.0%} held out for validation" if held_out else ""
                raise InvalidRequest(
                    f"training_file: {file.filename!r} gives {train_tokens} training tokens{held}; training needs "
                    f"more than the model's context of {block_size}", param="training_file")
    if isinstance(spec, GenerateSpec) and model is not None:
        context = model_context(model)
        if spec.sampling.max_new_tokens >= context:
            raise InvalidRequest(
                f"sampling.max_new_tokens: {spec.sampling.max_new_tokens} new tokens leave no room for a prompt in "
                f"the model's context of {context} tokens", param="sampling.max_new_tokens")


def model_context(model: Model) -> int:
    """The model's context length in tokens: n_positions of its Hugging Face config (transformers' default when
    absent; the import check made it a positive integer)."""
    return model.config.get("n_positions", CONFIG_DEFAULTS["n_positions"])


def initial_progress(spec: AnySpec) -> dict[str, Any]:
    """A job's progress before a worker reports any (an input file's total is its record count, set on create)."""
    if isinstance(spec, GenerateSpec):
        return {"total": len(spec.prompts) if spec.prompts is not None else None, "completed": 0, "failed": 0}
    return {"step": 0, "total_steps": spec.hyperparameters.max_steps, "loss": None, "val_loss": None,
            "tokens_per_second": None, "eta_seconds": None}


def warnings(spec: AnySpec) -> list[str]:
    """Settings of the job that cannot take effect as asked (each becomes a warning event at submission)."""
    if isinstance(spec, GenerateSpec):
        return spec.sampling.ignored()
    hyper = spec.hyperparameters
    if hyper.max_steps is None:  # a run in epochs: its length is known once the data is read (the worker warns)
        return []
    explicit = [field for field in PERIODIC if field in hyper.model_fields_set]
    return hyper.beyond_run(hyper.max_steps, f"max_steps {hyper.max_steps}", explicit)
