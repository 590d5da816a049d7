"""Training and fine-tuning jobs: claim the job, prepare (or reuse) its dataset, build or load the model, run the
Trainer with callbacks that report to the database, resume from the last checkpoint after a takeover, register
the model it produced."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpt2core import GPT2, Trainer
from gpt2core.batch_probe import largest_micro_batch
from gpt2core.data import PreparedDataset
from gpt2core.device import default_device
from gpt2core.stopping import TrainingDiverged
from gpt2core.train import checkpoint_name, latest_checkpoint
from jobs import execution
from jobs.auto import auto_global_batch, cpu_micro_batch_limit, has_auto, resolve_auto
from jobs.errors import BrokerUnavailable, DomainError
from jobs.models import Checkpoint, File, Job, Model
from jobs.queue import enqueue
from jobs.readers import HELD_OUT_FRACTION, training_file_is_jsonl
from jobs.specs import PERIODIC, FinetuneSpec, LoraMethod, TrainSpec, job_spec
from jobs.storage import disk_full_error
from jobs.states import CANCELLED, FAILED, PAUSED, QUEUED, SUCCEEDED

from .convert import compiles, lora_settings, model_config, train_config
from .datasets import prepared
from .devices import worker_devices
from .distributed import Supervisor
from .launch import ModelSource, TrainingLaunch
from .reporting import CheckpointRetention, JobReporter
from .runtime import ACTIVE_JOBS, JobFailure, LeaseKeeper, Runtime, error_for, is_infrastructure_error

log = logging.getLogger("workers.training")



def total_steps(spec: TrainSpec, train_tokens: int, block_size: int) -> int:
    hyper = spec.hyperparameters
    if hyper.max_steps is not None:
        return hyper.max_steps
    assert hyper.n_epochs is not None  # the spec gives one of the two
    per_step = hyper.batch_size * hyper.grad_accum_steps * block_size
    return max(1, math.ceil(hyper.n_epochs * train_tokens / per_step))


def model_source(rt: Runtime, job: Job, spec: TrainSpec) -> tuple[ModelSource, str]:
    """Where the model to train comes from, and the base of its name: a preset or shape from scratch (initial
    weights drawn from the job's seed), or a registered model; for method "lora", that model wrapped with peft's
    LoRA adapters (gpt2core.lora.apply_lora), drawn from the job's seed. After a restart this runs again, so the
    Trainer resumes on the same base with fresh adapters and loads the saved ones. Every training process of a
    job on several devices builds the same model from it (workers.launch)."""
    assert spec.seed is not None  # drawn at submission
    if isinstance(spec, FinetuneSpec):
        base = rt.persist(lambda session: session.get(Model, job.base_model_id)) if job.base_model_id else None
        if base is None or not Path(base.storage_path, "config.json").is_file():
            raise JobFailure("model_not_found", f"The base model {spec.model!r} no longer exists.", "model")
        lora = lora_settings(spec.method).to_dict() if isinstance(spec.method, LoraMethod) else None
        return ModelSource(seed=spec.seed, pretrained=base.storage_path, lora=lora), base.name
    name = spec.model if isinstance(spec.model, str) else spec.model.name
    return ModelSource(seed=spec.seed, config=model_config(spec.model).to_dict()), name


def register_model(rt: Runtime, job: Job, spec: TrainSpec, model: GPT2, base_name: str) -> str:
    """Save the trained model in Hugging Face format and register it; a retry finds the same model id (and,
    when that registration committed with its files in place, writes nothing again).

    Nothing is left behind when it fails (a full disk, the database): the staging folder is removed, and so is
    the model's folder unless a model row refers to it. A LoRA model is merged first (in place; training is over):
    the registered model is a plain GPT-2 checkpoint."""
    from gpt2core.lora import is_lora, merge_lora

    model_id = execution.model_id_for_job(job.id)
    final = rt.artifacts.model_dir(model_id)
    # The database reads and writes below wait out an outage (rt.persist) while this worker's lease is renewed.
    existing = rt.persist(lambda session: session.get(Model, model_id))
    if existing is not None and Path(existing.storage_path, "config.json").is_file():
        return existing.id
    staging = final.with_name(f".{model_id}.partial")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        if is_lora(model):
            model = merge_lora(model)
        model.save_pretrained(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        config = json.loads((final / "config.json").read_text())  # as for imported models: Hugging Face's config
        return rt.persist(lambda session: execution.register_job_model(
            session, job.id, spec.model_name(base_name, job.id), str(final), config, model.num_parameters()).id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not model_registered(rt, model_id):
            shutil.rmtree(final, ignore_errors=True)
        raise


def model_registered(rt: Runtime, model_id: str) -> bool:
    """Whether a model row with this id exists; True when the database cannot tell (its files are then kept,
    and the garbage collector removes them later if no row ever refers to them)."""
    try:
        with rt.transaction() as session:
            return session.get(Model, model_id) is not None
    except Exception:
        log.warning("could not check whether model %s is registered; keeping its files", model_id, exc_info=True)
        return True


@contextmanager
def full_disk_fails_job(what: Callable[[], str], checkpoint_dir: Path) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) while the body writes becomes the job's `disk_full` failure: what was being
    written (`what()`), and that the last complete checkpoint is kept (the writer removed its partial output)."""
    try:
        yield
    except Exception as exc:
        error = disk_full_error(exc)
        if error is None:
            raise
        latest = latest_checkpoint(checkpoint_dir)
        kept = (f"The job's last complete checkpoint (step {int(latest.name.removeprefix('step-'))}) is kept."
                if latest is not None else "No checkpoint of this job was complete yet.")
        reason = os.strerror(error.errno) if error.errno is not None else "no space left"
        raise JobFailure("disk_full", f"The server's disk is full: writing {what()} failed ({reason}). {kept} "
                         "The operators must free disk space before the job is submitted again.") from exc


def run_training(rt: Runtime, job_id: str) -> None:
    """Run (or resume) training/fine-tuning job `job_id` if this delivery may; a duplicate does nothing.

    Ends the job succeeded, failed or cancelled; or hands it back to the queue, to resume from its last checkpoint
    on another worker, when this worker shuts down or loses the database or broker (never failing it for that).
    """
    lease_seconds = rt.settings.job_lease_seconds
    have = worker_devices(rt.settings).count
    with rt.transaction() as session:
        row = session.execute(select(Job.devices, Job.status).where(Job.id == job_id)).first()
    if row is not None and row.devices > have:  # an old message (the job was resumed on more devices), or a
        if row.status == QUEUED:                # worker told --queues beyond its devices
            log.error("job %s needs %d devices, this worker has %d (WORKER_DEVICES); leaving it queued for a worker "
                      "that has them: do not name queue train-%d in this worker's --queues", job_id, row.devices,
                      have, row.devices)
        return
    with rt.transaction() as session:
        job = execution.claim_job(session, job_id, rt.worker_id, lease_seconds,
                                  max_attempts=rt.settings.job_max_attempts,
                                  resume_own=job_id not in ACTIVE_JOBS)
        if job is None:
            log.info("job %s: nothing to do (finished, cancelled, or running elsewhere)", job_id)
            return
        training_file = session.get(File, job.training_file_id) if job.training_file_id else None
        validation_file = session.get(File, job.validation_file_id) if job.validation_file_id else None
    log.info("job %s: %s, attempt %d", job_id, job.type, job.attempts)

    def renew(session) -> str:
        return execution.renew_lease(session, job_id, rt.worker_id, lease_seconds)

    with LeaseKeeper(rt, renew, f"job {job_id}") as lease:
        reporter: JobReporter | None = None
        try:
            status, result, error, reporter = train(rt, job, training_file, validation_file, lease)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                status, result, error = FAILED, None, error_for(exc, job_id, user_paths(training_file, validation_file))
            else:
                log.warning("job %s: database or broker unreachable; handing the job back", job_id, exc_info=True)
                status, result, error = QUEUED, {"reason": f"it lost the database or the broker ({type(exc).__name__})"}, None
        if lease.lost:
            log.warning("job %s: another worker owns it now; leaving it alone", job_id)
            return

        def end(session: Session) -> bool:
            if reporter is not None:  # what the run could not write during a database outage, and its last progress
                reporter.store(session, reporter.current_progress(stopped=status != SUCCEEDED))
            if status == PAUSED:
                assert result is not None
                execution.pause(session, job_id, rt.worker_id, f"Job paused at step {result['step']}; the checkpoint "
                                "written there is where it resumes from")
                return False
            if status == QUEUED:
                assert result is not None
                return execution.hand_back(session, job_id, rt.worker_id, f"Worker {rt.worker_id} stopped: "
                                           f"{result['reason']}; the job is back in the queue and resumes from its "
                                           "last checkpoint on the next free worker")
            execution.finish_job(session, job_id, rt.worker_id, status, result=result, error=error)
            return False

        try:
            send = rt.persist(end)
        except execution.LeaseLost:
            log.warning("job %s: another worker owns it now; leaving it alone", job_id)
            return
    if send:
        try:
            enqueue(rt.celery, job.type, job_id, job.devices)
        except BrokerUnavailable:  # the sweeper sends it once the broker answers
            log.warning("job %s: handed back, but the broker is unreachable; the sweeper will send it", job_id)
    log.info("job %s: %s", job_id, status)


def train(rt: Runtime, job: Job, training_file: File | None, validation_file: File | None,
          lease: LeaseKeeper) -> tuple[str, dict | None, dict | None, JobReporter]:
    try:
        spec = job_spec(job)
    except DomainError as exc:
        raise JobFailure("invalid_file", exc.message, exc.param) from None
    assert isinstance(spec, TrainSpec) and training_file is not None and spec.seed is not None
    with full_disk_fails_job(lambda: "the tokens of the training data", rt.artifacts.checkpoint_dir(job.id)):
        dataset = prepared(rt, training_file, 0.0 if validation_file else HELD_OUT_FRACTION)
        validation = prepared(rt, validation_file, 0.0) if validation_file else None
        # the validation tokens and their loss mask (None: every token a target), aligned
        val_tokens, val_mask = ((validation.train, validation.train_mask) if validation is not None
                                else (dataset.val, dataset.val_mask))
    source, base_name = model_source(rt, job, spec)
    model = source.build()
    block_size = model.config.block_size
    if dataset.train.size <= block_size:
        raise JobFailure("invalid_file", f"The training file has {dataset.train.size} training tokens; the model "
                         f"needs more than its block_size ({block_size}).", "training_file")
    resolved: list[str] = []  # what the worker decides once it knows the data, the model and the device
    if has_auto(spec.hyperparameters):
        spec, described = resolve_auto_hyperparameters(spec, training_file, model, int(dataset.train.size))
        resolved.append(described)
    steps = total_steps(spec, int(dataset.train.size), block_size)
    if spec.hyperparameters.warmup_steps is None:  # a run in epochs that gave none: now its length is known
        hyper = spec.hyperparameters.model_copy(update={"warmup_steps": min(100, steps // 10)})
        spec = spec.model_copy(update={"hyperparameters": hyper})
        resolved.append(f"warmup_steps {hyper.warmup_steps} (a tenth of the run's {steps} steps, at most 100)")
    if resolved:  # stored, so the job shows what runs and every later attempt reads the same numbers
        values = spec.hyperparameters.model_dump(mode="json")
        rt.persist(lambda session: execution.store_hyperparameters(
            session, job.id, rt.worker_id, values, "Resolved " + "; ".join(resolved)))
    # an evaluation needs a window and a target in it (prompt tokens are not targets)
    has_val = val_tokens.size > block_size and (val_mask is None or bool(val_mask[1:].any()))
    config = train_config(spec.hyperparameters, steps=steps, seed=spec.seed, evaluate=has_val,
                          checkpoint_dir=rt.artifacts.checkpoint_dir(job.id),
                          compile=compiles(default_device().type, steps, source.lora is not None))
    reporter = JobReporter(rt, job.id, lease, steps, job.started_at)
    keep = spec.hyperparameters.keep_checkpoints or rt.settings.keep_checkpoints
    retention_policy = CheckpointRetention(rt, job.id, lease, keep, reporter)
    if job.attempts == 1:
        for message in ignored_settings(spec, steps, has_val, int(val_tokens.size), block_size):
            reporter.event(message, level="warning")
    callbacks = [reporter, retention_policy]
    reporter.adopt_checkpoint(latest_checkpoint(config.checkpoint_dir))
    trained: GPT2 | None = None  # the model in memory when it trained in this process
    try:
        if spec.devices > 1:  # torchrun's processes train it; the model is in its last checkpoint
            del model
            launch = TrainingLaunch(job_id=job.id, devices=spec.devices, model=source, config=config.to_dict(),
                                    train_dir=str(dataset.path), **validation_source(dataset, validation, has_val),
                                    user_paths=user_paths(training_file, validation_file))
            supervisor = Supervisor(launch, worker_devices(rt.settings).type, callbacks,
                                    events=lambda message, level: reporter.event(message, level=level),
                                    stop_requested=lambda: lease.should_stop,
                                    max_restarts=rt.settings.job_max_attempts)
            result = supervisor.run()
        else:
            trainer = Trainer(model, config, dataset.train, val_tokens if has_val else None, callbacks,
                              train_mask=dataset.train_mask, val_mask=val_mask if has_val else None)
            resume_from = latest_checkpoint(config.checkpoint_dir)
            if resume_from is not None:
                trainer.resume(resume_from)
                reporter.event(f"Resumed from the checkpoint at step {trainer.step}")
            else:
                held = (f", {val_tokens.size:,} held out of the training file for validation (its last "
                        f"{HELD_OUT_FRACTION:.0%}; give a validation_file to keep them)"
                        if has_val and validation is None else "")
                reporter.event(f"Training {trainer.describe_parameters()} for {steps} steps on {trainer.device}; "
                               f"{dataset.train.size:,} training tokens{held}")
            with full_disk_fails_job(lambda: f"the checkpoint at step {trainer.step}", config.checkpoint_dir):
                result = trainer.fit()
            trained = model
    except TrainingDiverged as exc:
        reporter.flush()
        raise diverged(rt, job.id, exc, config.checkpoint_dir) from None
    if result.stopped:
        if lease.cancelling or lease.lost:
            return CANCELLED, None, None, reporter
        if lease.pausing:
            return PAUSED, {"step": result.steps}, None, reporter
        reason = f"the worker is shutting down (a checkpoint was saved at step {result.steps})"
        return QUEUED, {"reason": reason}, None, reporter
    if reporter.val_loss is None and result.val_loss is not None:
        reporter.val_loss = round(result.val_loss, 4)
    reporter.finished(result.steps, result.final_loss)
    if trained is None:
        assert result.checkpoint is not None  # the Trainer writes one at the end of every run
        trained = GPT2.from_pretrained(result.checkpoint)  # LoRA's checkpoints hold the merged weights
    chosen, model_step = trained, result.steps
    if spec.hyperparameters.select_model == "best":
        best = Path(config.checkpoint_dir, checkpoint_name(result.best_step)) if result.best_step is not None else None
        if best is not None and (best / "config.json").is_file():
            chosen, model_step = GPT2.from_pretrained(best), result.best_step
        else:
            reporter.event('hyperparameters.select_model "best": no evaluation ran, so the model is the last '
                           "step's", level="warning")
    with full_disk_fails_job(lambda: "the trained model", rt.artifacts.checkpoint_dir(job.id)):
        model_id = register_model(rt, job, spec, chosen, base_name)
    return SUCCEEDED, {"model": model_id, "model_step": model_step, "stop_reason": result.stop_reason,
                       "steps": result.steps, "train_loss": result.final_loss, "val_loss": result.val_loss,
                       "best_step": result.best_step, "best_val_loss": result.best_val_loss}, None, reporter


def validation_source(dataset: PreparedDataset, validation: PreparedDataset | None, has_val: bool
                      ) -> dict[str, str | None]:
    """Where a TrainingLaunch finds the validation tokens: the validation file's tokens (its "train" split), the
    part held out of the training file ("val"), or none."""
    if not has_val:
        return {"val_dir": None}
    if validation is not None:
        return {"val_dir": str(validation.path), "val_split": "train"}
    return {"val_dir": str(dataset.path), "val_split": "val"}


def diverged(rt: Runtime, job_id: str, exc: TrainingDiverged, checkpoint_dir: Path) -> JobFailure:
    """The job's training_diverged failure: the step, what the loss did, the last good checkpoint (none is
    written while the loss is flagged) and what to try."""
    latest = latest_checkpoint(checkpoint_dir)
    kept = "No checkpoint was written before it."
    if latest is not None:
        step = int(latest.name.removeprefix("step-"))
        row = rt.persist(lambda session: session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)).first())
        registrable = (f" ({row.id}; register it as a model with POST /v1/jobs/{job_id}/checkpoints/{row.id}/model)"
                       if row is not None else "")
        kept = f"The last good checkpoint, at step {step}, is kept{registrable}."
    return JobFailure("training_diverged", f"Training diverged at step {exc.step}: {exc}. {kept} Try a lower "
                      "learning_rate (a half or a tenth of this one), more warmup_steps, or a larger batch.",
                      "hyperparameters.learning_rate")


def resolve_auto_hyperparameters(spec: TrainSpec, training_file: File, model: GPT2, train_tokens: int
                                 ) -> tuple[TrainSpec, str]:
    """The spec with its "auto" hyperparameters resolved (jobs.auto), and how, for the job's event."""
    hyper = spec.hyperparameters
    block_size = model.config.block_size
    jsonl = training_file_is_jsonl(training_file.purpose, training_file.filename)
    examples = (round(training_file.records * train_tokens / max(training_file.tokens or train_tokens, 1))
                if jsonl else train_tokens // block_size)
    method = spec.method.type if isinstance(spec, FinetuneSpec) else "train"
    device = default_device()
    limit = auto_global_batch(examples)
    max_micro = (largest_micro_batch(model, block_size, limit, device) if device.type == "cuda"
                 else cpu_micro_batch_limit(block_size))
    resolved = resolve_auto(hyper, examples=examples, parameters=model.num_parameters(), method=method,
                            max_micro_batch=max_micro, devices=spec.devices)
    values = resolved.model_dump(mode="json")
    described = ", ".join(f"{name} {values[name]:g}" for name in resolved.auto)
    if "batch_size" in resolved.auto:
        windows = resolved.batch_size * resolved.grad_accum_steps
        across = f" across {spec.devices} devices" if spec.devices > 1 else ""
        described += (f" (x grad_accum_steps {resolved.grad_accum_steps}: {windows} window{'s' * (windows != 1)} "
                      f"per step{across})")
    kind = "lines" if jsonl else f"windows of {block_size} tokens"
    return (spec.model_copy(update={"hyperparameters": resolved}),
            f'the "auto" hyperparameters for {examples:,} examples ({kind}), {model.num_parameters():,} parameters '
            f"on {device.type}: {described}")


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
