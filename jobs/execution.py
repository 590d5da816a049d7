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

The sweeper (`stale_jobs` + `mark_requeued`, run periodically by the workers, who then enqueue a message for
every job marked) finds jobs whose worker died: running or cancelling jobs whose lease expired, and running
generate jobs with a shard whose lease expired. A stale job is marked with the lease owner `REQUEUE_OWNER` for
`lease_seconds`, which any worker may claim at once and which keeps the sweeper from requeueing it again until
it passes. A generate job that is stale only through its shards, while its own lease is live, keeps its job
lease (its holder is alive): the expired shards get the `REQUEUE_OWNER` marker instead, and `claim_shard` takes
them like expired ones.

Generation shards. A generate job's input is planned into shards [start, stop) (`plan_shards`); workers claim
them one at a time under their own leases (`claim_shard`, `renew_shard`), concurrently on PostgreSQL through
FOR UPDATE SKIP LOCKED, and `complete_shard` upserts their results, so a shard done twice never duplicates a
result row. Any worker taking part may end the job with `finish_generation` (succeeded once every shard is done,
cancelled when it saw "cancelling", failed with an error); a job's running shards lose their leases when it ends.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Text, and_, case, cast, exists, func, null, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.errors import NotFound
from jobs.models import Checkpoint, GenerationResult, GenerationShard, Job, Model, new_id
from jobs.repository import add_event, create_model
from jobs.states import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, transition

__all__ = [
    "REQUEUE_OWNER", "FINISH_STATUSES", "SHARD_PENDING", "SHARD_RUNNING", "SHARD_DONE", "LeaseLost",
    "claim_job", "renew_lease", "update_progress", "finish_job", "finish_generation", "record_checkpoint",
    "latest_checkpoint", "model_id_for_job", "register_job_model", "stale_jobs", "mark_requeued", "plan_shards",
    "claim_shard", "renew_shard", "complete_shard", "release_shard", "shards_remaining",
]

#: The lease owner the sweeper writes on a job (or shard) it requeued: claimable by any worker at once.
REQUEUE_OWNER = "requeued"
#: The statuses a worker may end a job in.
FINISH_STATUSES = (SUCCEEDED, FAILED, CANCELLED)
SHARD_PENDING, SHARD_RUNNING, SHARD_DONE = "pending", "running", "done"

_RESULT_BATCH = 500  # rows per INSERT: 8 parameters each stays far below PostgreSQL's 65535


class LeaseLost(Exception):
    """The worker no longer holds the lease: another worker (or the sweeper) has it, or the job is gone.

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
    if not worker_id or worker_id == REQUEUE_OWNER:
        raise ValueError(f"worker_id must be a non-empty id other than {REQUEUE_OWNER!r}")


def _check_lease_seconds(lease_seconds: float) -> None:
    if not lease_seconds > 0:
        raise ValueError("lease_seconds must be positive")


def _lease_is_live(owner: str | None, expires_at: datetime | None, now: datetime) -> bool:
    """A real worker holds it and it has not passed. A REQUEUE_OWNER marker is never live: anyone may claim."""
    return owner is not None and owner != REQUEUE_OWNER and expires_at is not None and expires_at > now


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
              *, max_attempts: int | None = None) -> Job | None:
    """Take the job for `worker_id` and return it (running, leased until now + lease_seconds, attempts + 1),
    or None when this worker must not run it.

    Claimable: a queued job; a running job whose lease expired (a takeover, logged as a warning); a job the
    sweeper marked with REQUEUE_OWNER. None, changing nothing: a missing or finished job, or one whose lease
    is live (a duplicate delivery). A cancelling job whose worker is gone (lease expired or requeued) is
    cancelled here; one whose lease is live is left to its worker.

    `max_attempts` (optional): a running job that was already claimed that many times is failed instead of
    taken over (a job that keeps killing its workers), and None is returned.
    """
    now = _now(now)
    _check_worker(worker_id)
    _check_lease_seconds(lease_seconds)
    job = _lock_job(session, job_id)
    if job is None or job.status in TERMINAL:
        return None

    if job.status == QUEUED:
        transition(job, RUNNING)
        job.attempts += 1
        _set_lease(job, worker_id, lease_seconds, now)
        add_event(session, job.id, f"Started on worker {worker_id} (attempt {job.attempts})",
                  data={"attempt": job.attempts})
        return job

    if _lease_is_live(job.lease_owner, job.lease_expires_at, now):
        return None  # a duplicate delivery: the job's worker is alive
    previous = job.lease_owner

    if job.status == CANCELLING:
        _end_job(session, job, CANCELLED,
                 message="Job cancelled (its worker stopped before it finished the cancellation)")
        return None

    if job.status == RUNNING:
        if max_attempts is not None and job.attempts >= max_attempts:
            _end_job(session, job, FAILED, error={
                "code": "too_many_attempts",
                "message": f"The job's worker stopped {job.attempts} times before finishing; giving up",
                "param": None,
            })
            return None
        job.attempts += 1
        _set_lease(job, worker_id, lease_seconds, now)
        add_event(session, job.id, f"Resumed by worker {worker_id} after the previous lease expired",
                  level="warning", data={"attempt": job.attempts, "previous_owner": previous})
        return job
    return None


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


def finish_generation(session: Session, job_id: str, *, error: dict[str, Any] | None = None,
                      message: str | None = None) -> Job | None:
    """End a generate job on behalf of any worker taking part in it: no lease is needed, and the row lock makes
    concurrent callers safe (one ends the job, the others get None). Returns the ended job, or None when there
    is nothing to end yet (or any more).

    With `error`: a running or cancelling job fails with it. Else a cancelling job is cancelled, and a running
    job whose shards are planned and all done succeeds. `result` is {"total", "completed", "failed"} counted
    from the stored results (not for a failed job). Shard leases still held are cleared, so workers still on a
    shard get LeaseLost at their next renewal. None, changing nothing: a missing, queued or finished job, or a
    running one whose shards are not planned yet or not all done.
    """
    job = _lock_job(session, job_id)
    if job is None or job.status not in (RUNNING, CANCELLING):
        return None
    if job.type != "generate":
        raise ValueError(f"job {job_id!r} is a {job.type} job, not a generate job")
    if error is not None:
        _end_job(session, job, FAILED, error=error, message=message)
        return job
    if job.status == RUNNING:
        planned = shards_remaining(session, job_id, include_done=True) > 0 or (job.progress or {}).get("total") == 0
        if not planned or shards_remaining(session, job_id) > 0:
            return None
    completed, failed = _result_counts(session, job_id)
    total = (job.progress or {}).get("total", completed + failed)
    result = {"total": total, "completed": completed, "failed": failed}
    _end_job(session, job, SUCCEEDED if job.status == RUNNING else CANCELLED, result=result, message=message)
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
        add_event(session, job.id, message or "Job succeeded")
    else:
        add_event(session, job.id, message or "Job cancelled")


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
                      storage_path: str, bytes: int) -> Checkpoint:
    """Record the checkpoint of `step`; recording the same step again updates that row (one per job and step)."""
    stmt = _insert(session, Checkpoint).values(
        id=new_id("ckpt"), job_id=job_id, step=step, train_loss=train_loss, val_loss=val_loss,
        storage_path=storage_path, bytes=bytes, created_at=datetime.now(timezone.utc),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "step"],
        set_={name: stmt.excluded[name] for name in ("train_loss", "val_loss", "storage_path", "bytes")},
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


# The sweeper


def _requeue_marker_live(now: datetime):
    return and_(Job.lease_owner == REQUEUE_OWNER, Job.lease_expires_at >= now)


def _job_lease_expired(now: datetime):
    return and_(Job.status.in_((RUNNING, CANCELLING)), Job.lease_expires_at < now)


def _expired_shards(now: datetime):
    return and_(GenerationShard.status != SHARD_DONE, GenerationShard.lease_expires_at < now)


def stale_jobs(session: Session, now: datetime | None = None, limit: int = 100) -> list[tuple[str, str]]:
    """(job_id, type) of the jobs that need a new message, oldest lease first: running or cancelling jobs whose
    lease expired, and running generate jobs with an unfinished shard whose lease expired. A job requeued less
    than its marker's lease_seconds ago is not returned again."""
    now = _now(now)
    shard_stale = and_(
        Job.type == "generate",
        Job.status == RUNNING,
        or_(Job.lease_owner.is_(None), Job.lease_expires_at.is_(None), ~_requeue_marker_live(now)),
        exists().where(GenerationShard.job_id == Job.id, _expired_shards(now)),
    )
    rows = session.execute(
        select(Job.id, Job.type)
        .where(or_(_job_lease_expired(now), shard_stale))
        .order_by(Job.lease_expires_at, Job.id)
        .limit(limit)
    ).all()
    return [(row.id, row.type) for row in rows]


def mark_requeued(session: Session, job_id: str, lease_seconds: float, now: datetime | None = None) -> bool:
    """Mark a stale job as requeued, under its row lock; True when the caller should enqueue a message for it,
    False when it is not stale any more (its worker renewed, someone claimed it, or it finished).

    A job whose own lease expired gets lease_owner = REQUEUE_OWNER until now + lease_seconds: any worker may
    claim it at once, and the sweeper leaves it alone until then. A generate job stale only through its shards
    keeps its live job lease; its expired shards get that marker instead (claim_shard takes them at once)."""
    now = _now(now)
    _check_lease_seconds(lease_seconds)
    job = _lock_job(session, job_id)
    if job is None:
        return False
    until = now + timedelta(seconds=lease_seconds)
    if job.status in (RUNNING, CANCELLING) and job.lease_expires_at is not None and job.lease_expires_at < now:
        previous = job.lease_owner
        job.lease_owner, job.lease_expires_at = REQUEUE_OWNER, until
        if previous == REQUEUE_OWNER:
            message = "Requeued again: no worker took the job since it was last requeued"
        else:
            message = f"Requeued: the lease of worker {previous} expired"
        add_event(session, job.id, message, level="warning", data={"previous_owner": previous})
        return True
    if job.type != "generate" or job.status != RUNNING:
        return False
    if job.lease_owner == REQUEUE_OWNER and job.lease_expires_at is not None and job.lease_expires_at >= now:
        return False
    shards = session.scalars(
        select(GenerationShard)
        .where(GenerationShard.job_id == job_id, _expired_shards(now))
        .order_by(GenerationShard.index)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).all()
    if not shards:
        return False
    previous_owners = {}
    for shard in shards:
        previous_owners[str(shard.index)] = shard.lease_owner
        shard.lease_owner, shard.lease_expires_at, shard.updated_at = REQUEUE_OWNER, until, now
    indexes = ", ".join(previous_owners)
    add_event(session, job.id, f"Requeued shard(s) {indexes}: their workers' leases expired", level="warning",
              data={"shards": previous_owners})
    return True


# Generation shards


def plan_shards(session: Session, job_id: str, total: int, shard_size: int) -> int:
    """Split inputs [0, total) into ceil(total / shard_size) pending shards and set the job's progress to
    {"total", "completed": 0, "failed": 0}. Idempotent: when the job has shards, returns their count and
    changes nothing."""
    if total < 0:
        raise ValueError("total must not be negative")
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    job = _lock_job(session, job_id)  # serialises concurrent planners of one job
    if job is None:
        raise NotFound("job", job_id)
    existing = shards_remaining(session, job_id, include_done=True)
    if existing:
        return existing
    count = math.ceil(total / shard_size)
    now = datetime.now(timezone.utc)
    if count:
        session.execute(
            _insert(session, GenerationShard),
            [
                {"job_id": job_id, "index": i, "start": i * shard_size, "stop": min(total, (i + 1) * shard_size),
                 "status": SHARD_PENDING, "attempts": 0, "updated_at": now}
                for i in range(count)
            ],
        )
    job.progress = {"total": total, "completed": 0, "failed": 0}
    session.flush()
    return count


def claim_shard(session: Session, job_id: str, worker_id: str, lease_seconds: float,
                now: datetime | None = None) -> GenerationShard | None:
    """The lowest-index claimable shard (pending, running with an expired lease, or requeued by the sweeper),
    now running under `worker_id`'s lease with attempts + 1; None when no shard is claimable or the job is not
    running (cancelling, finished, gone). Concurrent claimers never get the same shard (SKIP LOCKED on
    PostgreSQL, the write lock on SQLite)."""
    now = _now(now)
    _check_worker(worker_id)
    _check_lease_seconds(lease_seconds)
    if _job_status(session, job_id) != RUNNING:
        return None
    claimable = or_(
        GenerationShard.status == SHARD_PENDING,
        and_(
            GenerationShard.status == SHARD_RUNNING,
            or_(GenerationShard.lease_expires_at.is_(None), GenerationShard.lease_expires_at <= now,
                GenerationShard.lease_owner.is_(None), GenerationShard.lease_owner == REQUEUE_OWNER),
        ),
    )
    shard = session.scalars(
        select(GenerationShard)
        .where(GenerationShard.job_id == job_id, claimable)
        .order_by(GenerationShard.index)
        .limit(1)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).first()
    if shard is None:
        return None
    previous = shard.lease_owner if shard.status == SHARD_RUNNING else None
    shard.status = SHARD_RUNNING
    shard.attempts += 1
    shard.updated_at = now
    _set_lease(shard, worker_id, lease_seconds, now)
    if previous is not None and previous != worker_id:
        reason = "it was requeued" if previous == REQUEUE_OWNER else f"the lease of worker {previous} expired"
        add_event(session, job_id, f"Shard {shard.index} taken over by worker {worker_id} after {reason}",
                  level="warning", data={"shard": shard.index, "previous_owner": previous,
                                         "attempt": shard.attempts})
    session.flush()
    return shard


def renew_shard(session: Session, job_id: str, index: int, worker_id: str, lease_seconds: float,
                now: datetime | None = None) -> str | None:
    """Extend `worker_id`'s lease on the shard and return the job's status (watch for "cancelling").
    LeaseLost when the shard is not running under this worker any more (taken over, released, done, gone)."""
    now = _now(now)
    _check_lease_seconds(lease_seconds)
    shard = _lock_shard(session, job_id, index)
    if shard is None or shard.status != SHARD_RUNNING or shard.lease_owner != worker_id:
        holder = None if shard is None else shard.lease_owner
        raise LeaseLost(
            f"Worker {worker_id!r} no longer holds shard {index} of job {job_id!r}",
            job_id=job_id, worker_id=worker_id, holder=holder, index=index,
        )
    _set_lease(shard, worker_id, lease_seconds, now)
    shard.updated_at = now
    return _job_status(session, job_id)


def _result_rows(job_id: str, shard: GenerationShard, results: Iterable[dict[str, Any]],
                 now: datetime) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        index = result["index"]
        if not shard.start <= index < shard.stop:
            raise ValueError(f"result index {index} is outside shard {shard.index} [{shard.start}, {shard.stop})")
        error = result.get("error")
        rows.append({
            "job_id": job_id,
            "index": index,
            "custom_id": result.get("custom_id"),
            "prompt": result["prompt"],
            "completions": result.get("completions") or [],
            "usage": result.get("usage") or {},
            "error": null() if error is None else error,  # SQL NULL, not JSON null: "error IS NULL" counts
            "created_at": now,
        })
    return rows


def _upsert_results(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    for start in range(0, len(rows), _RESULT_BATCH):
        stmt = _insert(session, GenerationResult).values(list(rows[start:start + _RESULT_BATCH]))
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "index"],
            set_={name: stmt.excluded[name] for name in ("custom_id", "prompt", "completions", "usage", "error")},
        )
        session.execute(stmt)


def _result_counts(session: Session, job_id: str) -> tuple[int, int]:
    """(completed, failed) results of the job. A result without error has SQL NULL or, written through the ORM,
    JSON null; both count as completed."""
    failed = and_(GenerationResult.error.is_not(None), cast(GenerationResult.error, Text) != "null")
    total, failures = session.execute(
        select(func.count(), func.coalesce(func.sum(case((failed, 1), else_=0)), 0))
        .where(GenerationResult.job_id == job_id)
    ).one()
    return total - failures, failures


def complete_shard(session: Session, job_id: str, index: int, worker_id: str,
                   results: Sequence[dict[str, Any]]) -> bool:
    """Store the shard's results (dicts with index, custom_id, prompt, completions, usage, error; upserted on
    (job_id, index), so a shard done twice never duplicates a row), mark the shard done, recompute the job's
    progress counts from its results, and return True iff every shard of the job is now done.

    A worker whose shard lease passed to another worker meanwhile still completes it (its results are as good);
    that is logged as a warning. LeaseLost only when the shard (or job) is gone."""
    now = datetime.now(timezone.utc)
    job = _lock_job(session, job_id)
    shard = _lock_shard(session, job_id, index)
    if job is None or shard is None:
        raise LeaseLost(f"Shard {index} of job {job_id!r} does not exist", job_id=job_id, worker_id=worker_id,
                        index=index)
    _upsert_results(session, _result_rows(job_id, shard, results, now))

    if shard.status == SHARD_DONE:
        add_event(session, job_id, f"Shard {index} completed again by worker {worker_id} "
                                   f"(already done by {shard.lease_owner})", level="warning",
                  data={"shard": index, "worker": worker_id, "done_by": shard.lease_owner})
    elif shard.lease_owner != worker_id:
        after = "was released" if shard.lease_owner is None else f"passed to {shard.lease_owner}"
        add_event(session, job_id, f"Shard {index} completed by worker {worker_id} after its lease {after}",
                  level="warning", data={"shard": index, "worker": worker_id, "lease_owner": shard.lease_owner})
    shard.status = SHARD_DONE
    shard.lease_owner = worker_id  # kept as the record of who completed it; no live lease
    shard.lease_expires_at = None
    shard.updated_at = now

    completed, failed = _result_counts(session, job_id)
    progress = dict(job.progress or {})
    if "total" not in progress:
        progress["total"] = session.scalar(
            select(func.coalesce(func.max(GenerationShard.stop), 0)).where(GenerationShard.job_id == job_id)
        )
    progress.update(completed=completed, failed=failed)
    job.progress = progress
    session.flush()
    return shards_remaining(session, job_id) == 0


def release_shard(session: Session, job_id: str, index: int, worker_id: str) -> bool:
    """Give a running shard back (pending, lease cleared), e.g. when the worker stops for a cancellation.
    True when released; False, changing nothing, when the shard is not running under this worker (any more)."""
    shard = _lock_shard(session, job_id, index)
    if shard is None or shard.status != SHARD_RUNNING or shard.lease_owner != worker_id:
        return False
    shard.status = SHARD_PENDING
    _clear_lease(shard)
    shard.updated_at = datetime.now(timezone.utc)
    session.flush()
    return True


def shards_remaining(session: Session, job_id: str, *, include_done: bool = False) -> int:
    """How many of the job's shards are not done (all of them with include_done)."""
    stmt = select(func.count()).select_from(GenerationShard).where(GenerationShard.job_id == job_id)
    if not include_done:
        stmt = stmt.where(GenerationShard.status != SHARD_DONE)
    return session.scalar(stmt) or 0
