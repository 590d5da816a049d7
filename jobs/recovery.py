"""Recovery from the database: what the workers' sweeper does, so that nothing accepted is ever lost.

The database, not the broker, decides which jobs need a worker. Every pass (each worker's main process runs one
every half lease, see workers/sweeper.py) does three things, each one short transaction per job under the job's
row lock, so sweepers on many workers never act twice on the same job:

1. Lost workers (`lost_jobs` + `recover_lost_job`): a running or cancelling job whose lease expired had its worker
   die. `execution.worker_lost` puts it back to ``queued`` (it resumes from its last checkpoint) or, once
   JOB_MAX_ATTEMPTS workers were lost on it, fails it with "worker_lost".
2. Lost generation shards (`lost_shards` + `recover_lost_shard`): a shard whose worker died while the job's own
   worker lives goes back to the pool, where the job's worker (or any other) takes it; a shard that lost
   JOB_MAX_ATTEMPTS workers fails its job.
3. Lost messages (`jobs_to_dispatch` + `mark_dispatched`): a queued job whose last message was sent more than
   JOB_REDISPATCH_SECONDS ago and for which no message waits in the broker now (the broker restarted empty, the
   API died between its commit and its publish, a queue was purged, a worker took the message and died) gets
   exactly one new message, recorded as an event. While a message waits (all workers are busy), none is added:
   a job waits with one message, however long.

The broker is asked only which job ids have a message waiting (jobs.queue.waiting_job_ids); when it cannot say
(an unknown transport), a queued job is sent again once per JOB_REDISPATCH_SECONDS at most, and the lease in
`execution.claim_job` makes every extra delivery a no-op.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from jobs.execution import _end_job, _lock_job, _lock_shard, _now, worker_lost
from jobs.models import SHARD_DONE, SHARD_PENDING, GenerationShard, Job
from jobs.repository import add_event
from jobs.states import CANCELLING, FAILED, PAUSING, QUEUED, RUNNING

__all__ = ["lost_jobs", "recover_lost_job", "lost_shards", "recover_lost_shard", "jobs_to_dispatch",
           "mark_dispatched"]


def lost_jobs(session: Session, now: datetime | None = None, limit: int = 100) -> list[str]:
    """Ids of running, cancelling or pausing jobs whose lease expired, oldest lease first."""
    now = _now(now)
    return list(session.scalars(
        select(Job.id).where(Job.status.in_((RUNNING, CANCELLING, PAUSING)), Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at, Job.id).limit(limit)
    ))


def recover_lost_job(session: Session, job_id: str, max_attempts: int, now: datetime | None = None) -> bool:
    """If the job's worker is still gone (checked again under the row lock), record it with
    `execution.worker_lost`; True when the job is queued again and needs a message."""
    now = _now(now)
    job = _lock_job(session, job_id)
    if job is None or job.status not in (RUNNING, CANCELLING, PAUSING) or job.lease_expires_at is None:
        return False
    if job.lease_expires_at >= now:
        return False  # its worker renewed meanwhile
    return worker_lost(session, job, max_attempts)


def lost_shards(session: Session, now: datetime | None = None, limit: int = 100) -> list[tuple[str, int]]:
    """(job_id, index) of unfinished shards whose lease expired, in running generate jobs whose own worker is
    alive (a job whose worker is gone is recovered as a whole, by `recover_lost_job`)."""
    now = _now(now)
    rows = session.execute(
        select(GenerationShard.job_id, GenerationShard.index)
        .join(Job, Job.id == GenerationShard.job_id)
        .where(GenerationShard.status != SHARD_DONE, GenerationShard.lease_expires_at < now,
               Job.status == RUNNING, Job.lease_expires_at >= now)
        .order_by(GenerationShard.lease_expires_at).limit(limit)
    ).all()
    return [(job_id, index) for job_id, index in rows]


def recover_lost_shard(session: Session, job_id: str, index: int, max_attempts: int,
                       now: datetime | None = None) -> bool:
    """Give a shard whose worker is gone back to the pool (pending, an event naming the worker); fail its job
    with "worker_lost" when `max_attempts` workers already took it. True when something changed."""
    now = _now(now)
    job = _lock_job(session, job_id)  # the job before its shards: one lock order
    shard = _lock_shard(session, job_id, index)
    if job is None or shard is None or job.status != RUNNING or shard.status == SHARD_DONE:
        return False
    if shard.lease_expires_at is None or shard.lease_expires_at >= now:
        return False
    previous = shard.lease_owner
    add_event(session, job_id, f"Shard {index}: attempt {shard.attempts} ended without a word from worker {previous} "
              "(it stopped renewing its lease); the shard goes back to the pool", level="warning",
              data={"shard": index, "attempt": shard.attempts, "worker": previous})
    if shard.attempts >= max_attempts:
        _end_job(session, job, FAILED, error={
            "code": "worker_lost",
            "message": f"The workers running shard {index} (prompts {shard.start} to {shard.stop - 1}) were lost "
                       f"{shard.attempts} times, the most allowed (JOB_MAX_ATTEMPTS={max_attempts}); the job is not "
                       "tried again. Its events list each attempt and its worker.",
            "param": None,
        })
        return True
    shard.status, shard.lease_owner, shard.lease_expires_at, shard.updated_at = SHARD_PENDING, None, None, now
    return True


def _dispatch_due(now: datetime, redispatch_seconds: float):
    return and_(Job.status == QUEUED,
                or_(Job.dispatched_at.is_(None), Job.dispatched_at < now - timedelta(seconds=redispatch_seconds)))


def jobs_to_dispatch(session: Session, redispatch_seconds: float, now: datetime | None = None,
                     limit: int = 500) -> list[tuple[str, str, int]]:
    """(job_id, type, devices) of queued jobs whose last message was sent more than `redispatch_seconds` ago (or never),
    oldest first: the candidates for a new message, if none waits in the broker."""
    now = _now(now)
    rows = session.execute(
        select(Job.id, Job.type, Job.devices).where(_dispatch_due(now, redispatch_seconds))
        .order_by(Job.created_at, Job.id).limit(limit)
    ).all()
    return [(row.id, row.type, row.devices) for row in rows]


def mark_dispatched(session: Session, job_id: str, redispatch_seconds: float, message: str,
                    now: datetime | None = None) -> bool:
    """Under the job's row lock: if it is still queued and due, stamp it sent now and log `message`; True when
    the caller must send the message (in the same transaction, so a failed send leaves the job due)."""
    now = _now(now)
    job = _lock_job(session, job_id)
    if job is None or job.status != QUEUED:
        return False
    if job.dispatched_at is not None and job.dispatched_at >= now - timedelta(seconds=redispatch_seconds):
        return False  # another sweeper sent it meanwhile
    job.dispatched_at = now
    add_event(session, job_id, message, level="warning", data={"dispatched_at": now.timestamp()})
    return True
