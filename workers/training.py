"""Training and fine-tuning jobs: claim the job, prepare (or reuse) its dataset, build or load the model, run the
Trainer with callbacks that report to the database, resume from the last checkpoint after a takeover, register
the model it produced."""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from gpt2core import GPT2, GPT2Tokenizer, Trainer, load_dataset, prepare_dataset
from gpt2core.data import FORMAT_VERSION, DatasetError, PreparedDataset
from gpt2core.train import StepMetrics, TrainerCallback, latest_checkpoint
from jobs import execution, repository
from jobs.errors import DomainError
from jobs.models import File, Job, Model
from jobs.readers import HELD_OUT_FRACTION, is_jsonl
from jobs.specs import PERIODIC, FinetuneSpec, TrainSpec, job_spec
from jobs.states import CANCELLED, FAILED, SUCCEEDED

from .convert import model_config, new_model, train_config
from .runtime import JobFailure, LeaseKeeper, Runtime, error_for

log = logging.getLogger("workers.training")

PROGRESS_INTERVAL = 1.0  # seconds between progress writes
METRIC_EVENTS = 100  # about this many metrics events over a run


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (the dataset cache is shared by every worker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepared(rt: Runtime, file: File, val_fraction: float) -> PreparedDataset:
    """The file's tokens, prepared once per (content, tokenizer, split) and reused by every later job."""
    key = f"{file.sha256}-{GPT2Tokenizer.name}-v{FORMAT_VERSION}-val{val_fraction:g}"
    folder = rt.artifacts.root / "datasets" / key
    with locked(folder.with_suffix(".lock")):
        try:
            return load_dataset(folder)
        except DatasetError:
            pass
        # The format the upload was checked as, read by the same gpt2core.corpus functions.
        prepare_dataset([Path(file.storage_path)], folder, val_fraction=val_fraction,
                        format="jsonl" if is_jsonl(file.filename) else "text")
        return load_dataset(folder)


def total_steps(spec: TrainSpec, train_tokens: int, block_size: int) -> int:
    hyper = spec.hyperparameters
    if hyper.max_steps is not None:
        return hyper.max_steps
    assert hyper.n_epochs is not None  # the spec gives one of the two
    per_step = hyper.batch_size * hyper.grad_accum_steps * block_size
    return max(1, math.ceil(hyper.n_epochs * train_tokens / per_step))


def build_model(rt: Runtime, job: Job, spec: TrainSpec) -> tuple[GPT2, str]:
    """The model to train and the base of its name: a preset or shape from scratch (initial weights drawn from
    the job's seed), or a registered model."""
    if isinstance(spec, FinetuneSpec):
        with rt.transaction() as session:
            base = session.get(Model, job.base_model_id) if job.base_model_id else None
            if base is None or not Path(base.storage_path, "config.json").is_file():
                raise JobFailure("model_not_found", f"The base model {spec.model!r} no longer exists.", "model")
            return GPT2.from_pretrained(base.storage_path), base.name
    assert spec.seed is not None  # drawn at submission
    name = spec.model if isinstance(spec.model, str) else spec.model.name
    return new_model(model_config(spec.model), spec.seed), name


class JobReporter(TrainerCallback):
    """Writes what the Trainer does into the job: progress (about once a second), metrics and message events,
    checkpoint rows. Its should_stop() is the job's cancellation (or the loss of its lease)."""

    def __init__(self, rt: Runtime, job_id: str, lease: LeaseKeeper, steps: int):
        self.rt, self.job_id, self.lease, self.steps = rt, job_id, lease, steps
        self.metrics_every = max(1, steps // METRIC_EVENTS)
        self.val_loss: float | None = None
        self.last_write = 0.0

    def event(self, message: str, type: str = "message", data: dict[str, Any] | None = None,
              level: str = "info") -> None:
        if not self.lease.lost:
            with self.rt.transaction() as session:
                repository.add_event(session, self.job_id, message, type=type, data=data, level=level)

    def on_step(self, metrics: StepMetrics) -> None:
        now = time.monotonic()
        if now - self.last_write >= PROGRESS_INTERVAL or metrics.step == self.steps:
            self.last_write = now
            remaining = self.steps - metrics.step
            progress = {
                "step": metrics.step, "total_steps": self.steps, "loss": round(metrics.loss, 4),
                "val_loss": self.val_loss, "tokens_per_second": round(metrics.tokens_per_second, 1),
                "eta_seconds": round(remaining * metrics.step_time, 1),
            }
            if not self.lease.lost:
                try:
                    with self.rt.transaction() as session:
                        self.lease.observe(execution.update_progress(
                            session, self.job_id, self.rt.worker_id, progress, self.rt.settings.job_lease_seconds))
                except execution.LeaseLost:
                    self.lease.lost = True
        if metrics.step % self.metrics_every == 0 or metrics.step == self.steps:
            self.event(f"step {metrics.step}/{self.steps}: loss {metrics.loss:.4f}", "metrics", {
                "step": metrics.step, "loss": metrics.loss, "learning_rate": metrics.learning_rate,
                "grad_norm": metrics.grad_norm, "tokens_per_second": metrics.tokens_per_second})

    def on_eval(self, step: int, val_loss: float, perplexity: float) -> None:
        self.val_loss = round(val_loss, 4)
        self.event(f"step {step}: validation loss {val_loss:.4f} (perplexity {perplexity:.1f})", "metrics",
                   {"step": step, "val_loss": val_loss, "perplexity": perplexity})

    def on_sample(self, step: int, samples) -> None:
        self.event(f"step {step}: samples", data={"step": step, "samples": [
            {"prompt": sample.prompt, "text": sample.text} for sample in samples]})

    def on_checkpoint(self, step: int, path: Path, train_loss: float | None, val_loss: float | None) -> None:
        if self.lease.lost:
            return
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        with self.rt.transaction() as session:
            execution.record_checkpoint(session, self.job_id, step, train_loss, val_loss, str(path), size)
            repository.add_event(session, self.job_id, f"Checkpoint saved at step {step}")

    def should_stop(self) -> bool:
        return self.lease.should_stop


def register_model(rt: Runtime, job: Job, spec: TrainSpec, model: GPT2, base_name: str) -> str:
    """Save the trained model in Hugging Face format and register it; a retry finds the same model id."""
    model_id = execution.model_id_for_job(job.id)
    final = rt.artifacts.model_dir(model_id)
    staging = final.with_name(f".{model_id}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    config = json.loads((final / "config.json").read_text())  # as for imported models: Hugging Face's config
    with rt.transaction() as session:
        registered = execution.register_job_model(
            session, job.id, spec.model_name(base_name, job.id), str(final), config, model.num_parameters())
        return registered.id


def run_training(rt: Runtime, job_id: str) -> None:
    """Run (or resume) training/fine-tuning job `job_id` if this delivery may; a duplicate does nothing."""
    lease_seconds = rt.settings.job_lease_seconds
    with rt.transaction() as session:
        job = execution.claim_job(session, job_id, rt.worker_id, lease_seconds)
        if job is None:
            log.info("job %s: nothing to do (finished, cancelled, or running elsewhere)", job_id)
            return
        training_file = session.get(File, job.training_file_id) if job.training_file_id else None
        validation_file = session.get(File, job.validation_file_id) if job.validation_file_id else None
    log.info("job %s: %s, attempt %d", job_id, job.type, job.attempts)

    def renew(session) -> str:
        return execution.renew_lease(session, job_id, rt.worker_id, lease_seconds)

    with LeaseKeeper(rt, renew, f"job {job_id}") as lease:
        try:
            outcome = train(rt, job, training_file, validation_file, lease)
        except Exception as exc:
            outcome = (FAILED, None, error_for(exc, job_id, user_paths(training_file, validation_file)))
        if lease.lost:
            log.warning("job %s: another worker owns it now; leaving it alone", job_id)
            return
        status, result, error = outcome
        with rt.transaction() as session:
            execution.finish_job(session, job_id, rt.worker_id, status, result=result, error=error)
    log.info("job %s: %s", job_id, status)


def train(rt: Runtime, job: Job, training_file: File | None, validation_file: File | None,
          lease: LeaseKeeper) -> tuple[str, dict | None, dict | None]:
    try:
        spec = job_spec(job)
    except DomainError as exc:
        raise JobFailure("invalid_file", exc.message, exc.param) from None
    assert isinstance(spec, TrainSpec) and training_file is not None and spec.seed is not None
    dataset = prepared(rt, training_file, 0.0 if validation_file else HELD_OUT_FRACTION)
    val_tokens = prepared(rt, validation_file, 0.0).train if validation_file else dataset.val
    model, base_name = build_model(rt, job, spec)
    block_size = model.config.block_size
    if dataset.train.size <= block_size:
        raise JobFailure("invalid_file", f"The training file has {dataset.train.size} training tokens; the model "
                         f"needs more than its block_size ({block_size}).", "training_file")
    steps = total_steps(spec, int(dataset.train.size), block_size)
    has_val = val_tokens.size > block_size
    config = train_config(spec.hyperparameters, steps=steps, seed=spec.seed, evaluate=has_val,
                          checkpoint_dir=rt.artifacts.checkpoint_dir(job.id))
    reporter = JobReporter(rt, job.id, lease, steps)
    for message in ignored_settings(spec, steps, has_val, int(val_tokens.size), block_size):
        reporter.event(message, level="warning")
    trainer = Trainer(model, config, dataset.train, val_tokens if has_val else None, [reporter])
    resume_from = latest_checkpoint(config.checkpoint_dir)
    if resume_from is not None:
        trainer.resume(resume_from)
        reporter.event(f"Resumed from the checkpoint at step {trainer.step}")
    else:
        reporter.event(f"Training {model.num_parameters():,} parameters for {steps} steps on {trainer.device}; "
                       f"{dataset.train.size:,} training tokens")
    result = trainer.fit()
    if result.stopped:
        return CANCELLED, None, None
    model_id = register_model(rt, job, spec, model, base_name)
    return SUCCEEDED, {"model": model_id, "steps": result.steps, "train_loss": result.final_loss,
                       "val_loss": result.val_loss}, None


def ignored_settings(spec: TrainSpec, steps: int, has_val: bool, val_tokens: int, block_size: int) -> list[str]:
    """Hyperparameters that cannot take effect as given, known only once the data is read (warning events)."""
    hyper = spec.hyperparameters
    found = []
    if hyper.eval_every and not has_val:
        source = "validation_file" if spec.validation_file else f"the {HELD_OUT_FRACTION:.0%} held out of the training file"
        found.append(f"hyperparameters.eval_every {hyper.eval_every}: no evaluation will run: {source} has "
                     f"{val_tokens} tokens, the model needs more than its block_size ({block_size})")
    if hyper.warmup_steps and hyper.warmup_steps > steps:
        found.append(f"hyperparameters.warmup_steps {hyper.warmup_steps} is more than the run's {steps} steps: "
                     f"warmup is cut to {steps}")
    if hyper.n_epochs is not None:  # with max_steps, these were reported at submission
        periodic = [f for f in PERIODIC if not (f == "eval_every" and not has_val)]
        found += hyper.beyond_run(steps, f"the run's {steps} steps ({hyper.n_epochs:g} epochs)", periodic)
    return found


def user_paths(*files: File | None) -> dict[str, str]:
    """Server paths that may appear in an error, and what the user knows them as."""
    return {file.storage_path: file.filename for file in files if file is not None}
