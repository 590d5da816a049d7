"""Running jobs safely: the database side of the workers.

Every function takes a Session and leaves commit/rollback to the caller's `session_scope`, so one call is one
transaction. Read-modify-writes lock their rows first (SELECT ... FOR UPDATE on PostgreSQL; on SQLite the
session's BEGIN IMMEDIATE already holds the database's write lock). `now` parameters default to the current
UTC time and exist so tests can control time; they must be timezone-aware.

Job leases. A worker runs a job while `lease_owner` is its id and `lease_expires_at` lies ahead; it renews the
lease (`renew_lease`, `update_progress`) well before it passes, and each renewal returns the job's status so the
worker notices "cancelling". Whoever holds the lease is the only one who may write progress or finish the job:
everyone else gets `LeaseLost` and must stop at once, writing nothing more. `claim_job` is safe against
duplicate deliveries: a job whose lease is live is left alone.

Workers that vanish. A worker that dies stops renewing; `claim_job` (a redelivered message) and the recovery pass
in `jobs.recovery` (run by every worker's sweeper) notice the expired lease and call `worker_lost`, which puts
the job back in the queue or, after too many lost workers, fails it. A worker that stops on purpose (shutdown)
`hand_back`s its job at once.

Pausing. A job the user pauses while it runs is "pausing" until its worker stops at a safe point (a training job
after writing a checkpoint; a generate job once no shard is being generated) and calls `pause`; a pausing job whose
worker is gone, or that is handed back, is paused there and then (a training job resumes from its last
checkpoint).

Generation shards have leases of their own, in `jobs.shards`.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.errors import NotFound
from jobs.models import SHARD_PENDING, SHARD_RUNNING, Checkpoint, GenerationShard, Job, Model, new_id
from jobs.repository import add_event, create_model
from jobs.states import CANCELLED, CANCELLING, FAILED, PAUSED, PAUSING, QUEUED, RUNNING, SUCCEEDED, TERMINAL, transition

__all__ = [
    "FINISH_STATUSES", "LeaseLost", "claim_job", "worker_lost", "hand_back", "renew_lease", "update_progress",
    "finish_job", "pause", "store_hyperparameters", "record_checkpoint", "latest_checkpoint", "model_id_for_job", "register_job_model",
]

#: The statuses a worker may end a job in.
FINISH_STATUSES = (SUCCEEDED, FAILED, CANCELLED)


class LeaseLost(Exception):
    """The worker no longer holds the lease: another worker has it, the sweeper gave the job back to the queue, or the job is gone.

    The worker must stop working on the job (or shard) without writing anything more."""

    def __init__(self, message: str, *, job_id: str | None = None, worker_id: str | None = None,
                 holder: str | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.worker_id = worker_id
        self.holder = holder
        self.index = index


# Helpers


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now


def _check_worker(worker_id: str) -> None:
    if not worker_id:
        raise ValueError("worker_id must be a non-empty id")


def _check_lease_seconds(lease_seconds: float) -> None:
    if not lease_seconds > 0:
        raise ValueError("lease_seconds must be positive")


def _lease_is_live(owner: str | None, expires_at: datetime | None, now: datetime) -> bool:
    """A worker holds it and it has not passed."""
    return owner is not None and expires_at is not None and expires_at > now


def _lock_job(session: Session, job_id: str) -> Job | None:
    """The job row, locked. Always lock the job before any of its shards (one order, no deadlock). On PostgreSQL
    the lock is FOR NO KEY UPDATE: it does not wait on, or block, the key-share locks that inserting an event,
    checkpoint or result referencing the job takes."""
    return session.scalars(
        select(Job).where(Job.id == job_id).with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    ).one_or_none()


def _lock_shard(session: Session, job_id: str, index: int) -> GenerationShard | None:
    return session.scalars(
        select(GenerationShard)
        .where(GenerationShard.job_id == job_id, GenerationShard.index == index)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def _owned_job(session: Session, job_id: str, worker_id: str) -> Job:
    """The job, locked, if `worker_id` holds its lease; else LeaseLost."""
    job = _lock_job(session, job_id)
    if job is None:
        raise LeaseLost(f"Job {job_id!r} no longer exists", job_id=job_id, worker_id=worker_id)
    if job.lease_owner != worker_id:
        raise LeaseLost(
            f"Worker {worker_id!r} no longer holds the lease of job {job_id!r} (held by {job.lease_owner!r})",
            job_id=job_id, worker_id=worker_id, holder=job.lease_owner,
        )
    return job


def _set_lease(row: Job | GenerationShard, worker_id: str, lease_seconds: float, now: datetime) -> None:
    row.lease_owner = worker_id
    row.lease_expires_at = now + timedelta(seconds=lease_seconds)


def _clear_lease(row: Job | GenerationShard) -> None:
    row.lease_owner = None
    row.lease_expires_at = None


def _insert(session: Session, model: type):
    """INSERT with ON CONFLICT support for the session's backend."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"upserts are implemented for PostgreSQL and SQLite, not {dialect}")


def _job_status(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


# Job leases


def claim_job(session: Session, job_id: str, worker_id: str, lease_seconds: float, now: datetime | None = None,
              *, max_attempts: int | None = None, resume_own: bool = False) -> Job | None:
    """Take the job for `worker_id` and return it (running, leased until now + lease_seconds, attempts + 1),
    or None when this worker must not run it.

    Claimable: a queued job; a running job whose worker is gone (its lease expired: `worker_lost` records that
    first, and fails the job instead once `max_attempts` workers were lost on it); with `resume_own` (the worker
    knows it is not running the job now: an earlier delivery was interrupted by an infrastructure error), a
    running job whose lease `worker_id` itself still holds. None, changing nothing: a missing or finished job,
    or one whose lease is live (a duplicate delivery). A cancelling job whose worker is gone is cancelled here.
    """
    now = _now(now)
    _check_worker(worker_id)
    _check_lease_seconds(lease_seconds)
    job = _lock_job(session, job_id)
    if job is None or job.status in TERMINAL or job.status == PAUSED:
        return None
    if job.status in (RUNNING, CANCELLING, PAUSING):
        if resume_own and job.lease_owner == worker_id and job.status == RUNNING:
            job.attempts += 1
            _set_lease(job, worker_id, lease_seconds, now)
            add_event(session, job.id, f"Resumed on worker {worker_id} (attempt {job.attempts}) after its previous "
                      "delivery was interrupted", level="warning", data={"attempt": job.attempts, "worker": worker_id})
            return job
        if _lease_is_live(job.lease_owner, job.lease_expires_at, now):
            return None  # a duplicate delivery: the job's worker is alive
        if not worker_lost(session, job, max_attempts):
            return None
    transition(job, RUNNING)
    job.attempts += 1
    _set_lease(job, worker_id, lease_seconds, now)
    add_event(session, job.id, f"Started on worker {worker_id} (attempt {job.attempts})",
              data={"attempt": job.attempts, "worker": worker_id})
    return job


def worker_lost(session: Session, job: Job, max_attempts: int | None) -> bool:
    """Record that the worker holding the (locked) running, cancelling or pausing `job` is gone; True when the job
    is queued again for another worker.

    A cancelling job is cancelled; a pausing one is paused (it resumes from its last checkpoint). A running one
    counts the loss (`workers_lost`, an event naming the attempt and the worker) and goes back to queued, or fails
    with code "worker_lost" once `max_attempts` workers were lost on it (a job that kills every worker it runs on:
    out of memory, a crash in a kernel, a machine that reboots)."""
    previous = job.lease_owner
    if job.status == CANCELLING:
        _end_job(session, job, CANCELLED, message="Job cancelled (its worker stopped before it finished the cancellation)")
        return False
    if job.status == PAUSING:
        resumes = "with the prompts not done"
        if job.type != "generate":  # its progress is where a resume starts from
            checkpoint = latest_checkpoint(session, job.id)
            step = checkpoint.step if checkpoint is not None else 0
            job.progress = {**(job.progress or {}), "step": step, "eta_seconds": None}
            resumes = f"from its checkpoint at step {step}" if checkpoint is not None else "from the start"
        _pause(session, job, f"Job paused (its worker stopped before it finished pausing); resumed, it goes on {resumes}")
        return False
    job.workers_lost += 1
    add_event(session, job.id, f"Attempt {job.attempts} ended without a word from worker {previous}: it stopped "
              "renewing its lease (killed, out of memory, or its machine stopped)", level="warning",
              data={"attempt": job.attempts, "worker": previous, "workers_lost": job.workers_lost})
    if max_attempts is not None and job.workers_lost >= max_attempts:
        _end_job(session, job, FAILED, error={
            "code": "worker_lost",
            "message": f"The job's worker was lost {job.workers_lost} times while running it (killed, out of "
                       f"memory, or its machine stopped), the most allowed (JOB_MAX_ATTEMPTS={max_attempts}); it is "
                       "not tried again. Its events list each attempt and its worker.",
            "param": None,
        })
        return False
    transition(job, QUEUED)
    _clear_lease(job)
    job.dispatched_at = None  # its message was consumed: the sweeper sends one at once (jobs.recovery)
    return True


def hand_back(session: Session, job_id: str, worker_id: str, message: str, now: datetime | None = None) -> bool:
    """The lease holder gives its running job back to the queue (it is shutting down, or lost its database for a
    while): queued, lease cleared, `message` logged as a warning event, and marked as sent now; True when the
    caller must send it a message. A cancelling job is cancelled instead, a pausing one paused (False).
    LeaseLost as renew_lease."""
    now = _now(now)
    job = _owned_job(session, job_id, worker_id)
    if job.status == CANCELLING:
        _end_job(session, job, CANCELLED, message="Job cancelled (its worker stopped before it finished)")
        return False
    if job.status == PAUSING:
        _pause(session, job, f"Job paused: {message}")
        return False
    transition(job, QUEUED)
    _clear_lease(job)
    job.dispatched_at = now
    add_event(session, job.id, message, level="warning", data={"worker": worker_id, "attempt": job.attempts})
    return True


def renew_lease(session: Session, job_id: str, worker_id: str, lease_seconds: float,
                now: datetime | None = None) -> str:
    """Extend `worker_id`'s lease to now + lease_seconds and return the job's status (watch for "cancelling").
    LeaseLost when the lease belongs to someone else now, or the job is gone."""
    now = _now(now)
    _check_lease_seconds(lease_seconds)
    job = _owned_job(session, job_id, worker_id)
    _set_lease(job, worker_id, lease_seconds, now)
    return job.status


def update_progress(session: Session, job_id: str, worker_id: str, progress: dict[str, Any], lease_seconds: float,
                    now: datetime | None = None) -> str:
    """Replace the job's progress, renew the lease, return the status; LeaseLost like renew_lease."""
    now = _now(now)
    _check_lease_seconds(lease_seconds)
    job = _owned_job(session, job_id, worker_id)
    job.progress = dict(progress)
    _set_lease(job, worker_id, lease_seconds, now)
    return job.status


def pause(session: Session, job_id: str, worker_id: str, message: str) -> Job:
    """The lease holder of a pausing job stopped at a safe point: the job is paused (lease cleared, `message` as
    an event). A job cancelled meanwhile (cancelling) is cancelled instead. LeaseLost as renew_lease;
    InvalidTransition for a job that is not pausing."""
    job = _owned_job(session, job_id, worker_id)
    if job.status == CANCELLING:
        _end_job(session, job, CANCELLED, message="Job cancelled (while it was pausing)")
    else:
        _pause(session, job, message)
    return job


def _pause(session: Session, job: Job, message: str) -> None:
    transition(job, PAUSED)
    _clear_lease(job)
    _release_running_shards(session, job)
    add_event(session, job.id, message, data={"status": PAUSED})


def store_hyperparameters(session: Session, job_id: str, worker_id: str, hyperparameters: dict[str, Any],
                          message: str) -> Job:
    """The lease holder stores the hyperparameters it resolved ("auto" values) in the job's parameters, with
    `message` as an event; LeaseLost as renew_lease."""
    job = _owned_job(session, job_id, worker_id)
    job.params = {**job.params, "hyperparameters": dict(hyperparameters)}
    add_event(session, job.id, message, data={"hyperparameters": dict(hyperparameters)})
    return job


def _error_body(error: dict[str, Any] | None, message: str | None) -> dict[str, Any]:
    error = error or {}
    return {
        "code": str(error.get("code") or "job_failed"),
        "message": str(error.get("message") or message or "The job failed"),
        "param": error.get("param"),
    }


def finish_job(session: Session, job_id: str, worker_id: str, status: str, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None, message: str | None = None) -> Job:
    """End the job in `status` (succeeded, failed or cancelled); only the lease holder may (else LeaseLost).

    A cancelling job may still end succeeded or failed; a running job cannot end cancelled (InvalidTransition:
    a worker ends a job cancelled only after it saw "cancelling"). Stores `result` and `error` (normalised to
    {"code", "message", "param"}; a failed job always gets one), clears the lease (and any shard leases),
    stamps finished_at and logs `message` (or a default) as an event, level "error" with the error as data for
    a failed job.
    """
    if status not in FINISH_STATUSES:
        raise ValueError(f"status must be one of {', '.join(FINISH_STATUSES)}")
    job = _owned_job(session, job_id, worker_id)
    _end_job(session, job, status, result=result, error=error, message=message)
    return job


def _end_job(session: Session, job: Job, status: str, *, result: dict[str, Any] | None = None,
             error: dict[str, Any] | None = None, message: str | None = None) -> None:
    transition(job, status)  # InvalidTransition before anything else changes
    body = _error_body(error, message) if status == FAILED or error is not None else None
    job.result = result
    job.error = body
    _clear_lease(job)
    _release_running_shards(session, job)
    if status == FAILED:
        add_event(session, job.id, message or f"Job failed: {body['message'] if body else 'unknown error'}",
                  level="error", data=body)
    elif status == SUCCEEDED:
        add_event(session, job.id, message or "Job succeeded", data={"status": SUCCEEDED})
    else:
        add_event(session, job.id, message or "Job cancelled", data={"status": CANCELLED})


def _release_running_shards(session: Session, job: Job) -> None:
    """A finished job's running shards go back to pending without a lease: their workers' renewals fail."""
    if job.type != "generate":
        return
    session.execute(
        update(GenerationShard)
        .where(GenerationShard.job_id == job.id, GenerationShard.status == SHARD_RUNNING)
        .values(status=SHARD_PENDING, lease_owner=None, lease_expires_at=None,
                updated_at=datetime.now(timezone.utc))
    )


# Checkpoints and models


def record_checkpoint(session: Session, job_id: str, step: int, train_loss: float | None, val_loss: float | None,
                      storage_path: str, bytes: int, *, val_accuracy: float | None = None) -> Checkpoint:
    """Record the checkpoint of `step`; recording the same step again updates that row (one per job and step).
    `val_loss` and `val_accuracy` are those of an evaluation at this very step (None between evaluations)."""
    stmt = _insert(session, Checkpoint).values(
        id=new_id("ckpt"), job_id=job_id, step=step, train_loss=train_loss, val_loss=val_loss,
        val_accuracy=val_accuracy, storage_path=storage_path, bytes=bytes, created_at=datetime.now(timezone.utc),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "step"],
        set_={name: stmt.excluded[name] for name in ("train_loss", "val_loss", "val_accuracy", "storage_path",
                                                      "bytes")},
    )
    session.execute(stmt)
    return session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.step == step)
        .execution_options(populate_existing=True)
    ).one()


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    """The job's checkpoint with the highest step, or None."""
    return session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
    ).first()


def model_id_for_job(job_id: str) -> str:
    """The id of the model a job produces: "job-<hex>" -> "model-<hex>"."""
    return "model-" + job_id.removeprefix("job-")


def register_job_model(session: Session, job: Job | str, name: str, storage_path: str, config: dict[str, Any],
                       parameter_count: int) -> Model:
    """The model the job produced (source "job", owned by the job's owner). Its id derives from the job id, so
    registering again (a retried worker) returns the existing row instead of creating a second one."""
    if isinstance(job, str):
        found = session.get(Job, job)
        if found is None:
            raise NotFound("job", job)
        job = found
    model_id = model_id_for_job(job.id)
    existing = session.get(Model, model_id)
    if existing is not None:
        return existing
    try:
        with session.begin_nested():
            return create_model(session, job.owner, name, "job", storage_path, config, parameter_count,
                                job_id=job.id, model_id=model_id)
    except IntegrityError:
        # A concurrent registration of the same job won the insert.
        existing = session.get(Model, model_id, populate_existing=True)
        if existing is None:
            raise
        return existing
