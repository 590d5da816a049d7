"""Trainer callbacks that report a job's run into the database: progress, metrics and message events, per-step
metric rows, checkpoint rows (JobReporter), and the checkpoint retention that keeps a job's disk use bounded
(CheckpointRetention)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpt2core.train import StepMetrics, TrainerCallback, list_checkpoints
from jobs import execution, repository, retention, training_metrics
from jobs.models import Checkpoint, JobMetric

from .runtime import LeaseKeeper, Runtime, is_infrastructure_error

log = logging.getLogger("workers.training")

PROGRESS_INTERVAL = 1.0  # seconds between progress writes
METRIC_EVENTS = 100  # about this many metrics events over a run
MAX_PENDING = 10_000  # writes kept while the database cannot be reached


class JobReporter(TrainerCallback):
    """Writes what the Trainer does into the job: progress (about once a second), metrics and message events,
    per-step metric rows (the steps jobs.training_metrics keeps, and every evaluation step), checkpoint rows. Its
    should_stop() is the job's cancellation, the loss of its lease, or this worker's shutdown.

    Metric rows are buffered and written with the next write of anything (the progress, about once a second, or
    an event), in its transaction: never one transaction per step. Their elapsed_seconds count from
    `started_at`, the job's first start (on this worker's clock), so a resumed run continues the count.

    A database blip never stops training: a write that cannot get through is kept (the newest MAX_PENDING) and
    written with the next one that does; a progress update that fails is simply replaced by the next."""

    def __init__(self, rt: Runtime, job_id: str, lease: LeaseKeeper, steps: int, started_at: datetime | None = None):
        self.rt, self.job_id, self.lease, self.steps = rt, job_id, lease, steps
        self.metrics_every = max(1, steps // METRIC_EVENTS)
        # time.monotonic() at the job's first start: elapsed seconds survive a clock change during the run.
        since_start = 0.0 if started_at is None else max(0.0, time.time() - started_at.timestamp())
        self.started = time.monotonic() - since_start
        self.metric_rows: dict[int, dict[str, Any]] = {}  # by step, not yet handed to `pending`
        self.last_row: dict[str, Any] | None = None  # the latest step's row, kept or not (an evaluation keeps it)
        self.val_loss: float | None = None
        self.evaluation: tuple[int, float | None] | None = None  # (step, token accuracy) of the last evaluation
        self.last_write = 0.0
        self.step = 0
        self.tokens = 0  # training tokens seen, as of the last step
        self.progress: dict[str, Any] = {"tokens_per_second": None}  # the last progress written
        self.pending: list[Callable[[Session], object]] = []
        self.unreachable_since: float | None = None
        self.dropped = 0

    def store(self, session: Session, progress: dict[str, Any] | None = None) -> int:
        """Write, in `session`, what is pending, and `progress` (which renews the lease), with an event saying how
        long the database was away if it was; returns how many pending writes that was. LeaseLost as
        execution.update_progress."""
        self.queue_metric_rows()
        units = len(self.pending)
        if self.unreachable_since is not None:
            seconds = time.monotonic() - self.unreachable_since
            dropped = f"; {self.dropped} older ones were dropped" if self.dropped else ""
            repository.add_event(
                session, self.job_id, f"The database could not be reached for {seconds:.0f} s; training went "
                f"on, and the {units} writes of that time are stored now{dropped}", level="warning",
                data={"seconds": round(seconds, 1), "writes": units, "dropped": self.dropped})
        for unit in self.pending[:units]:
            unit(session)
        if progress is not None:
            self.lease.observe(execution.update_progress(
                session, self.job_id, self.rt.worker_id, progress, self.rt.settings.job_lease_seconds))
        return units

    def stored(self, units: int) -> None:
        """The transaction that stored `units` pending writes committed."""
        del self.pending[:units]
        self.unreachable_since, self.dropped = None, 0

    def flush(self, progress: dict[str, Any] | None = None) -> bool:
        """Write what is pending (and `progress`) in one transaction now; False when the database cannot be
        reached (all is kept for the next try). LeaseLost marks the lease lost."""
        if self.lease.lost or (not self.pending and progress is None):
            return True
        try:
            with self.rt.transaction() as session:
                units = self.store(session, progress)
        except execution.LeaseLost:
            self.lease.lost = True
            return True
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
                log.warning("job %s: database unreachable (%s); training goes on, writes are kept", self.job_id,
                            type(exc).__name__)
            return False
        self.stored(units)
        return True

    def queue_metric_rows(self) -> None:
        """Hand the buffered metric rows to `pending` as one write (kept there until it is stored)."""
        if self.metric_rows and not self.lease.lost:
            rows = list(self.metric_rows.values())
            self.pending.append(lambda session: training_metrics.upsert_metrics(session, self.job_id, rows))
            self.metric_rows = {}

    def write(self, unit: Callable[[Session], object]) -> None:
        """Store `unit`'s writes now, or as soon as the database answers again."""
        if self.lease.lost:
            return
        self.pending.append(unit)
        if len(self.pending) > MAX_PENDING:
            self.dropped += len(self.pending) - MAX_PENDING
            del self.pending[:-MAX_PENDING]
        self.flush()

    def event(self, message: str, type: str = "message", data: dict[str, Any] | None = None,
              level: str = "info") -> None:
        self.write(lambda session: repository.add_event(session, self.job_id, message, type=type, data=data,
                                                        level=level))

    def on_step(self, metrics: StepMetrics) -> None:
        self.step, self.tokens = metrics.step, metrics.tokens
        now = time.monotonic()
        self.last_row = {"step": metrics.step, "train_loss": metrics.loss, "val_loss": None,
                         "learning_rate": metrics.learning_rate, "grad_norm": metrics.grad_norm,
                         "tokens_per_second": metrics.tokens_per_second, "elapsed_seconds": now - self.started}
        if training_metrics.keeps_step(metrics.step, self.steps):
            self.metric_rows[metrics.step] = self.last_row
        if now - self.last_write >= PROGRESS_INTERVAL or metrics.step == self.steps:
            self.last_write = now
            remaining = self.steps - metrics.step
            self.progress = {
                "step": metrics.step, "total_steps": self.steps, "loss": round(metrics.loss, 4),
                "val_loss": self.val_loss, "tokens_per_second": round(metrics.tokens_per_second, 1),
                "eta_seconds": round(remaining * metrics.step_time, 1), "tokens": metrics.tokens,
            }
            self.flush(self.progress)
        if metrics.step % self.metrics_every == 0 or metrics.step == self.steps:
            self.event(f"step {metrics.step}/{self.steps}: loss {metrics.loss:.4f}", "metrics", {
                "step": metrics.step, "loss": metrics.loss, "learning_rate": metrics.learning_rate,
                "grad_norm": metrics.grad_norm, "tokens_per_second": metrics.tokens_per_second})

    def on_eval(self, step: int, val_loss: float, perplexity: float, accuracy: float | None) -> None:
        self.val_loss = round(val_loss, 4)
        self.evaluation = (step, accuracy)
        # The step's whole row (written again if it was already stored), so an evaluation step is always kept.
        latest = self.last_row if self.last_row is not None and self.last_row["step"] == step else {"step": step}
        self.metric_rows[step] = {**latest, "val_loss": val_loss}
        shown = f", token accuracy {accuracy:.1%}" if accuracy is not None else ""
        self.event(f"step {step}: validation loss {val_loss:.4f} (perplexity {perplexity:.1f}{shown})", "metrics",
                   {"step": step, "val_loss": val_loss, "perplexity": perplexity, "accuracy": accuracy})

    def on_sample(self, step: int, samples) -> None:
        self.event(f"step {step}: samples", data={"step": step, "samples": [
            {"prompt": sample.prompt, "text": sample.text} for sample in samples]})

    def on_checkpoint(self, step: int, path: Path, train_loss: float | None, val_loss: float | None) -> None:
        self.step = step
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        accuracy = self.evaluation[1] if self.evaluation is not None and self.evaluation[0] == step else None

        def record(session: Session) -> None:
            execution.record_checkpoint(session, self.job_id, step, train_loss, val_loss, str(path), size,
                                        val_accuracy=accuracy)
            repository.add_event(session, self.job_id, f"Checkpoint saved at step {step}")

        self.write(record)

    def adopt_checkpoint(self, path: Path | None) -> None:
        """Record the checkpoint a resumed run starts from if its row is missing: a worker killed between writing
        a checkpoint's files and recording it leaves one (the run resumes from the files, so the list must show
        them). Its training loss is the step's metric row's, if that was stored; its validation metrics unknown."""
        if path is None:
            return
        step = int(Path(path).name.removeprefix("step-"))

        def record(session: Session) -> None:
            if session.scalars(select(Checkpoint.id).where(Checkpoint.job_id == self.job_id,
                                                            Checkpoint.step == step)).first() is not None:
                return
            metric = session.get(JobMetric, (self.job_id, step))
            size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
            execution.record_checkpoint(session, self.job_id, step, metric.train_loss if metric else None, None,
                                        str(path), size)
            repository.add_event(session, self.job_id, f"Checkpoint at step {step} recorded on resume (its worker "
                                 "stopped before recording it)")

        self.write(record)

    def should_stop(self) -> bool:
        return self.lease.should_stop

    def current_progress(self, stopped: bool) -> dict[str, Any] | None:
        """The progress as of the last step trained (the last one written may be up to a second older); for a run
        that `stopped` before its end (a pause, a cancel, a shutdown) without an ETA. None before any step."""
        if self.last_row is None or (self.progress.get("step") == self.last_row["step"] and not stopped):
            return self.progress if self.progress.get("step") else None
        return {**self.progress, "step": self.last_row["step"], "total_steps": self.steps, "tokens": self.tokens,
                "loss": round(self.last_row["train_loss"], 4), "val_loss": self.val_loss,
                "eta_seconds": None if stopped else self.progress.get("eta_seconds")}

    def finished(self, step: int, loss: float | None) -> None:
        """The progress of a run that reached its end (also one resumed from its final checkpoint, which trains
        no further step)."""
        self.progress = {**self.progress, "step": step, "total_steps": self.steps, "eta_seconds": 0.0,
                         "loss": None if loss is None else round(loss, 4), "val_loss": self.val_loss}
        self.flush(self.progress)


class CheckpointRetention(TrainerCallback):
    """Keeps disk bounded while a job trains: after each checkpoint is recorded, only the job's last `keep`
    checkpoints and the one with the lowest validation loss stay (jobs.retention decides); the others' rows
    and directories are deleted, so the job's checkpoint list shows what exists. The newest checkpoint, the one
    training resumes from, always stays. Runs after the JobReporter (which records the checkpoint); never fails
    the job: what it cannot delete now, it deletes after the next checkpoint (or the garbage collector does)."""

    def __init__(self, rt: Runtime, job_id: str, lease: LeaseKeeper, keep: int, reporter: JobReporter):
        self.rt, self.job_id, self.lease, self.keep, self.reporter = rt, job_id, lease, keep, reporter

    def on_checkpoint(self, step: int, path: Path, train_loss: float | None, val_loss: float | None) -> None:
        if self.lease.lost or self.reporter.pending:
            return  # not this worker's job any more, or rows not stored yet (the database is unreachable)
        on_disk = {found: str(folder) for found, folder in list_checkpoints(Path(path).parent)}
        try:
            with self.rt.transaction() as session:
                doomed = retention.prune_checkpoint_rows(session, self.job_id, self.keep, on_disk)
        except Exception as exc:
            log.warning("job %s: checkpoint retention skipped (%s); it runs again after the next checkpoint",
                        self.job_id, type(exc).__name__, exc_info=not is_infrastructure_error(exc))
            return
        for folder in doomed:
            try:
                self.rt.artifacts.delete(Path(folder))
            except (OSError, ValueError):
                log.warning("job %s: could not remove checkpoint %s", self.job_id, folder, exc_info=True)
