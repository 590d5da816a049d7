"""Generation shards: the database side of bulk generation.

A generate job's input is planned into shards [start, stop) (`plan_shards`); workers claim them one at a time
under their own leases (`claim_shard`, `renew_shard`), concurrently on PostgreSQL through FOR UPDATE SKIP
LOCKED, and `complete_shard` upserts their results, so a shard done twice never duplicates a result row. Any
worker taking part may end the job with `finish_generation` (succeeded once every shard is done, cancelled when
it saw "cancelling", failed with an error); a job's running shards lose their leases when it ends. Conventions
(sessions, row locks, `now`) as in `jobs.execution`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Text, and_, case, cast, func, null, or_, select
from sqlalchemy.orm import Session

from jobs.errors import NotFound
from jobs.execution import (
    LeaseLost,
    _check_lease_seconds,
    _check_worker,
    _clear_lease,
    _end_job,
    _insert,
    _job_status,
    _lock_job,
    _lock_shard,
    _now,
    _pause,
    _set_lease,
)
from jobs.models import SHARD_DONE, SHARD_PENDING, SHARD_RUNNING, GenerationResult, GenerationShard, Job
from jobs.repository import add_event
from jobs.states import CANCELLED, CANCELLING, FAILED, PAUSING, RUNNING, SUCCEEDED

__all__ = ["SHARD_PENDING", "SHARD_RUNNING", "SHARD_DONE", "plan_shards", "claim_shard", "renew_shard",
           "complete_shard", "release_shard", "shards_remaining", "shards_running", "finish_generation"]

_RESULT_BATCH = 500  # rows per INSERT: 8 parameters each stays far below PostgreSQL's 65535


def finish_generation(session: Session, job_id: str, *, error: dict[str, Any] | None = None,
                      message: str | None = None, now: datetime | None = None) -> Job | None:
    """End a generate job on behalf of any worker taking part in it: no lease is needed, and the row lock makes
    concurrent callers safe (one ends the job, the others get None). Returns the ended job, or None when there
    is nothing to end yet (or any more).

    With `error`: a running, cancelling or pausing job fails with it. Else a cancelling job is cancelled, a pausing
    job is paused once no shard is being generated under a live lease (its stored results stay; resumed, it goes on
    with the shards not done), and a running job whose shards are planned and all done succeeds. `result` is
    {"total", "completed", "failed"} counted from the stored results (not for a failed job). Shard leases still held
    are cleared, so workers still on a shard get LeaseLost at their next renewal. None, changing nothing: a missing,
    queued or finished job, or a running one whose shards are not planned yet or not all done.
    """
    job = _lock_job(session, job_id)
    if job is None or job.status not in (RUNNING, CANCELLING, PAUSING):
        return None
    if job.type != "generate":
        raise ValueError(f"job {job_id!r} is a {job.type} job, not a generate job")
    if error is not None:
        _end_job(session, job, FAILED, error=error, message=message)
        return job
    if job.status == PAUSING:
        if shards_running(session, job_id, now):
            return None
        completed, failed = _result_counts(session, job_id)
        _pause(session, job, message or f"Job paused: {completed + failed} of {(job.progress or {}).get('total', '?')} "
               "prompts are done; resumed, it goes on with the rest")
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
    """The lowest-index claimable shard (pending, or running with an expired lease),
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
                GenerationShard.lease_owner.is_(None)),
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
        reason = f"the lease of worker {previous} expired"
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


def release_shard(session: Session, job_id: str, index: int, worker_id: str, *, count_attempt: bool = True) -> bool:
    """Give a running shard back (pending, lease cleared), e.g. when the worker stops for a cancellation.
    `count_attempt=False`: the attempt does not count towards the shard's attempts (its worker stopped on purpose,
    or lost the database, through no fault of the shard). True when released; False, changing nothing, when the
    shard is not running under this worker (any more)."""
    shard = _lock_shard(session, job_id, index)
    if shard is None or shard.status != SHARD_RUNNING or shard.lease_owner != worker_id:
        return False
    if not count_attempt:
        shard.attempts = max(shard.attempts - 1, 0)
    shard.status = SHARD_PENDING
    _clear_lease(shard)
    shard.updated_at = datetime.now(timezone.utc)
    session.flush()
    return True


def shards_running(session: Session, job_id: str, now: datetime | None = None) -> int:
    """How many of the job's shards are being generated under a live lease."""
    now = _now(now)
    return session.scalar(select(func.count()).select_from(GenerationShard).where(
        GenerationShard.job_id == job_id, GenerationShard.status == SHARD_RUNNING,
        GenerationShard.lease_owner.is_not(None), GenerationShard.lease_expires_at > now)) or 0


def shards_remaining(session: Session, job_id: str, *, include_done: bool = False) -> int:
    """How many of the job's shards are not done (all of them with include_done)."""
    stmt = select(func.count()).select_from(GenerationShard).where(GenerationShard.job_id == job_id)
    if not include_done:
        stmt = stmt.where(GenerationShard.status != SHARD_DONE)
    return session.scalar(stmt) or 0
