"""OpenAI's fine-tuning API over our finetune jobs: the request as a typed object that converts itself to a
jobs.specs.FinetuneSpec, and our jobs, events and checkpoints in the shapes the `openai` SDK reads.

A fine-tuning job *is* a finetune job (same id, same row, same worker): `POST /v1/fine_tuning/jobs` submits a
FinetuneSpec through jobs.submission like `POST /v1/jobs` does, and every finetune job, however it was submitted,
can be read in both shapes. Nothing here is stored twice; every number shown is computed from the job.

Hyperparameters, OpenAI's meaning -> ours:

* `n_epochs` (int or "auto") -> hyperparameters.n_epochs (jobs.auto resolves "auto" by OpenAI's own rule).
* `batch_size` (int or "auto"): examples per optimizer step -> the global batch: batch_size with grad_accum_steps
  1 ("auto": jobs.auto's split into the micro-batch the device fits).
* `learning_rate_multiplier` (float or "auto"): OpenAI scales "the original learning rate used for pretraining";
  ours is the peak rate GPT-3 used for the model's size (jobs.auto.auto_learning_rate with method "train"), so
  learning_rate = multiplier x that rate. "auto" is jobs.auto's full fine-tuning rate, a tenth of it (multiplier
  0.1, inside OpenAI's documented 0.05 to 0.2).
"""
from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.auto import auto_learning_rate
from jobs.errors import InvalidRequest
from jobs.models import Checkpoint, Job, JobEvent, Model, unix_time
from jobs.specs import (
    MAX_SEED,
    Auto,
    FinetuneSpec,
    FullMethod,
    Hyperparameters,
    Metadata,
    ModelId,
    ResourceId,
    Strict,
)
from jobs.states import CANCELLED, CANCELLING, FAILED, PAUSED, PAUSING, QUEUED, RUNNING, SUCCEEDED

#: Our job statuses as OpenAI's fine-tuning statuses. OpenAI has no word for a job being cancelled or paused,
#: so those keep ours: "cancelling" (it still ends as cancelled or, if it finished first, succeeded) and
#: "pausing"/"paused" (the status OpenAI's pause endpoint leaves a job in).
STATUS = {QUEUED: "queued", RUNNING: "running", PAUSING: "pausing", PAUSED: "paused", CANCELLING: "cancelling",
          SUCCEEDED: "succeeded", FAILED: "failed", CANCELLED: "cancelled"}
#: Our event levels as OpenAI's.
LEVELS = {"info": "info", "warning": "warn", "error": "error"}
EVENT_PREFIX = "ftevent-"
#: An event cursor: an event's id as shown, or its number alone.
EVENT_CURSOR_PATTERN = r"^(ftevent-)?[0-9]{1,10}$"


class FineTuningHyperparameters(Strict):
    """OpenAI's hyperparameters for a supervised fine-tune; each number or "auto" (the default)."""

    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Auto = Field(
        default="auto", description='Passes over the training file; "auto": from its size (OpenAI\'s rule).')
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        default="auto", description='Examples per optimizer step; "auto": 0.2% of the examples, as a power of two.')
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        default="auto", description="Times the model size's pretraining learning rate (GPT-3's table 2.1); "
                                    '"auto": 0.1.')


class SupervisedMethod(Strict):
    hyperparameters: FineTuningHyperparameters | None = None


class FineTuningMethod(Strict):
    """Only OpenAI's "supervised" (full fine-tuning); "dpo" and "reinforcement" are refused."""

    type: Literal["supervised"]
    supervised: SupervisedMethod | None = None


class FineTuningJobRequest(Strict):
    """The body of POST /v1/fine_tuning/jobs (what `client.fine_tuning.jobs.create(...)` sends)."""

    model: ModelId = Field(description="The id of a registered model of yours (model-...).")
    training_file: ResourceId = Field(description="A file with purpose fine-tune (or train): JSONL with "
                                                  "`prompt` and `completion` on every line, or any training file.")
    validation_file: ResourceId | None = None
    hyperparameters: FineTuningHyperparameters | None = None
    method: FineTuningMethod | None = None
    suffix: str | None = Field(default=None, description="The fine-tuned model is named '<base>:<suffix>' "
                               "(the rule of the finetune job's suffix).")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    metadata: Metadata | None = None
    integrations: list[Any] | None = Field(default=None, max_length=0, description="None are supported; only an "
                                           "empty list or null is accepted.")

    def chosen_hyperparameters(self) -> FineTuningHyperparameters:
        """The hyperparameters, from the top level or from method.supervised (InvalidRequest if both differ)."""
        nested = self.method.supervised.hyperparameters if self.method and self.method.supervised else None
        if nested is not None and self.hyperparameters is not None and nested != self.hyperparameters:
            raise InvalidRequest("hyperparameters: give them once, at the top level or in method.supervised",
                                 param="hyperparameters")
        return nested or self.hyperparameters or FineTuningHyperparameters()

    def to_spec(self, base_model: Model) -> FinetuneSpec:
        """Our finetune job for this request on `base_model` (the row `model` names: its size sets the
        learning rate a multiplier scales). ValidationError / InvalidRequest for what ours refuses."""
        chosen = self.chosen_hyperparameters()
        hyper: dict[str, Any] = {"n_epochs": chosen.n_epochs}
        if chosen.n_epochs != "auto":
            hyper["n_epochs"] = float(chosen.n_epochs)
        hyper["batch_size"] = chosen.batch_size
        multiplier = chosen.learning_rate_multiplier
        hyper["learning_rate"] = ("auto" if multiplier == "auto" else
                                  multiplier * pretraining_rate(base_model.parameter_count))
        return FinetuneSpec.model_validate({
            "type": "finetune", "model": self.model, "training_file": self.training_file,
            "validation_file": self.validation_file, "method": FullMethod(type="full"),
            "hyperparameters": Hyperparameters.model_validate(hyper, context={"submission": True}),
            "seed": self.seed, "suffix": self.suffix, "metadata": self.metadata or {},
        }, context={"submission": True})


def pretraining_rate(parameters: int) -> float:
    """The learning rate a multiplier of 1 means for a model of `parameters` parameters (jobs.auto's table)."""
    return auto_learning_rate(parameters, "train")


def openai_hyperparameters(job: Job, base_parameters: int | None) -> dict[str, Any]:
    """The job's hyperparameters in OpenAI's terms: "auto" until the worker resolves them, then the numbers
    that ran. A job given max_steps (submitted through /v1/jobs) has no n_epochs: null."""
    hyper = job.params.get("hyperparameters", {})
    epochs = hyper.get("n_epochs")
    if isinstance(epochs, float) and epochs.is_integer():
        epochs = int(epochs)
    batch = hyper.get("batch_size")
    if isinstance(batch, int):
        batch *= hyper.get("grad_accum_steps", 1)
    rate = hyper.get("learning_rate")
    multiplier: float | str | None = rate
    if isinstance(rate, (int, float)):
        multiplier = (float(f"{rate / pretraining_rate(base_parameters):.4g}") if base_parameters else None)
    return {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier}


def job_object(job: Job, base_model: Model | None, now: float | None = None) -> dict[str, Any]:
    """A finetune job as OpenAI's fine_tuning.job object (`base_model`: the row job.base_model_id names, or None
    once deleted)."""
    result = job.result or {}
    progress = job.progress or {}
    hyper = openai_hyperparameters(job, base_model.parameter_count if base_model is not None else None)
    estimated = None
    if job.status == RUNNING and isinstance(progress.get("eta_seconds"), (int, float)):
        estimated = int((now or time.time()) + progress["eta_seconds"])
    method: dict[str, Any] = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    if (job.params.get("method") or {}).get("type") == "lora":  # submitted through /v1/jobs: say what it is
        method["lora"] = {k: v for k, v in job.params["method"].items() if k != "type"}
    error = None
    if job.error:
        error = {"code": job.error.get("code"), "message": job.error.get("message"), "param": job.error.get("param")}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": unix_time(job.created_at),
        "finished_at": unix_time(job.finished_at),
        "model": job.params.get("model"),
        "fine_tuned_model": result.get("model") if job.status == SUCCEEDED else None,
        "organization_id": job.owner,
        "status": STATUS[job.status],
        "training_file": job.training_file_id,
        "validation_file": job.validation_file_id,
        "hyperparameters": hyper,
        "method": method,
        "result_files": [],
        "trained_tokens": progress.get("tokens") if job.status == SUCCEEDED else None,
        "seed": job.params.get("seed"),
        "user_provided_suffix": job.params.get("suffix"),
        "estimated_finish": estimated,
        "integrations": [],
        "metadata": job.metadata_ or None,
        "error": error,
    }


def event_object(event: JobEvent) -> dict[str, Any]:
    return {"id": f"{EVENT_PREFIX}{event.id}", "object": "fine_tuning.job.event", "created_at": unix_time(event.created_at),
            "level": LEVELS[event.level], "message": event.message, "data": event.data or {}, "type": event.type}


def event_cursor(after: str | None) -> int | None:
    """The event id an `after` names ("ftevent-<id>", or the bare id: EVENT_CURSOR_PATTERN); InvalidRequest for
    anything else."""
    if after is None:
        return None
    if not re.fullmatch(EVENT_CURSOR_PATTERN, after):
        raise InvalidRequest(f"after must be an event id ({EVENT_PREFIX}<number>), got {after[:60]!r}",
                             param="after", status=400)
    # Event ids are 32-bit integers: a larger cursor reads as the largest (every event is older).
    return min(int(after.removeprefix(EVENT_PREFIX)), 2**31 - 1)


def checkpoint_object(checkpoint: Checkpoint, job: Job, model_id: str | None) -> dict[str, Any]:
    """One of the job's checkpoints as OpenAI's fine_tuning.job.checkpoint. fine_tuned_model_checkpoint is a
    model id usable in a batch or generate job: the one registered from this checkpoint, or the job's model for
    the step it was taken from; null until either exists (POST /v1/jobs/{id}/checkpoints/{ckpt}/model makes one)."""
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix_time(checkpoint.created_at),
        "fine_tuning_job_id": job.id,
        "fine_tuned_model_checkpoint": model_id,
        "step_number": checkpoint.step,
        "metrics": {"step": checkpoint.step, "train_loss": checkpoint.train_loss, "valid_loss": checkpoint.val_loss,
                    "valid_mean_token_accuracy": checkpoint.val_accuracy,
                    "full_valid_loss": checkpoint.val_loss, "full_valid_mean_token_accuracy": checkpoint.val_accuracy},
    }


def metadata_filter(args: list[tuple[str, str]]) -> dict[str, str] | None:
    """`metadata[key]=value` query pairs as a dict (None without any); InvalidRequest for a malformed key."""
    found: dict[str, str] = {}
    for name, value in args:
        if name.startswith("metadata[") and name.endswith("]"):
            found[name[len("metadata["):-1]] = value
        elif name.startswith("metadata"):
            raise InvalidRequest("filter by metadata as metadata[key]=value", param=name[:60], status=400)
    return found or None


def matches(job: Job, wanted: dict[str, str] | None) -> bool:
    return not wanted or all((job.metadata_ or {}).get(key) == value for key, value in wanted.items())


def models_by_step(session: Session, job: Job) -> dict[int, str]:
    """The ids of the models made from the job's checkpoints, by step: its registered checkpoints', and the job's
    own model at the step it was taken from (result.model_step)."""
    found: dict[int, str] = {}
    result = job.result or {}
    if job.status == SUCCEEDED and result.get("model") and isinstance(result.get("model_step"), int):
        found[result["model_step"]] = result["model"]
    rows = session.scalars(select(Model).where(Model.job_id == job.id, Model.owner == job.owner,
                                               Model.source == "checkpoint").order_by(Model.created_at, Model.id))
    for model in rows:
        if model.checkpoint_step is not None:
            found.setdefault(model.checkpoint_step, model.id)
    return found
