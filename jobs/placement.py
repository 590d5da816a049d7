"""Which workers can run which jobs: the live workers and their device counts, and the queued jobs that ask for
more devices than any of them has.

Every worker's sweeper (workers/sweeper.py) records its worker here on each pass (`record_worker`), every half
lease, with the most devices of a training job it takes (its devices, or fewer when its --queues stop short); a
worker is live while it was seen within the last lease. A job on N devices waits in queue "train-N"
(jobs.queue.queue_for), which only workers that take N or more consume, so a job that fits no live worker simply
waits. The reconciliation tells it why (`check_placement`): once at least one worker is live and none takes N > 1
devices, the job gets a warning event naming the most any takes; when such a worker comes, the job runs; when
none has come after JOB_DEVICES_WAIT_SECONDS, a job that never ran fails with "devices_unavailable" (param
"devices"), and one that already trained is paused instead, keeping its checkpoints, to be resumed on fewer
devices (POST /v1/jobs/{id}/resume with {"devices": N}).

With no live worker at all nothing is said: every job waits for the workers alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from jobs.execution import _end_job, _lock_job, _now
from jobs.models import Job, Worker
from jobs.repository import add_event
from jobs.states import FAILED, PAUSED, QUEUED, transition

__all__ = ["record_worker", "forget_worker", "largest_live_worker", "check_placement", "Placement"]

#: A worker not seen for this many leases is removed from the table (it is long gone).
FORGET_AFTER_LEASES = 10


def record_worker(session: Session, worker_id: str, devices: int, device_type: str, lease_seconds: float,
                  now: datetime | None = None) -> None:
    """Note that worker `worker_id` (with `devices` devices of `device_type`) is alive now; drop workers not seen
    for FORGET_AFTER_LEASES leases."""
    now = _now(now)
    worker = session.get(Worker, worker_id)
    if worker is None:
        session.add(Worker(id=worker_id, devices=devices, device_type=device_type, started_at=now, seen_at=now))
    else:
        worker.devices, worker.device_type, worker.seen_at = devices, device_type, now
    session.execute(delete(Worker).where(Worker.seen_at < now - timedelta(seconds=FORGET_AFTER_LEASES * lease_seconds)))


def forget_worker(session: Session, worker_id: str) -> None:
    """Worker `worker_id` stopped (a clean shutdown): it no longer counts as live."""
    session.execute(delete(Worker).where(Worker.id == worker_id))


def largest_live_worker(session: Session, lease_seconds: float, now: datetime | None = None) -> int | None:
    """The most devices of a training job any worker seen within the last lease takes (0: none takes training
    jobs), or None when no worker is live."""
    now = _now(now)
    return session.scalar(select(func.max(Worker.devices)).where(
        Worker.seen_at >= now - timedelta(seconds=lease_seconds), Worker.seen_at <= now))


@dataclass
class Placement:
    """What one check did: jobs told no worker fits them, jobs failed (never ran) or paused (trained already) after
    waiting, jobs a worker fits again."""

    told: list[str]
    failed: list[str]
    fitting: list[str]
    paused: list[str] = field(default_factory=list)


def check_placement(session: Session, lease_seconds: float, wait_seconds: float,
                    now: datetime | None = None) -> Placement:
    """Tell queued jobs that ask for more devices than any live worker has (see the module docstring); one
    transaction, each job under its row lock."""
    now = _now(now)
    done = Placement([], [], [])
    largest = largest_live_worker(session, lease_seconds, now)
    if largest is None:
        return done
    floor = max(largest, 1)  # a one-device job waits for any training worker, as before devices existed
    waiting = session.scalars(select(Job.id).where(Job.status == QUEUED, Job.devices > floor)).all()
    for job_id in waiting:
        job = _lock_job(session, job_id)
        if job is None or job.status != QUEUED or job.devices <= floor:
            continue
        if job.devices_wanted_since is None:
            job.devices_wanted_since = now
            then = ("is paused (keeping its checkpoints)" if job.attempts else "fails")
            add_event(session, job.id, f"No live worker takes jobs on {job.devices} devices (the most any takes: "
                      f"{largest}): the job waits for one, and {then} if none comes within {wait_seconds:g} s "
                      f"(JOB_DEVICES_WAIT_SECONDS). Start a worker with WORKER_DEVICES={job.devices} or more, or pause "
                      "the job and resume it with fewer devices.", level="warning",
                      data={"devices": job.devices, "largest_worker": largest})
            done.told.append(job.id)
        elif job.devices_wanted_since <= now - timedelta(seconds=wait_seconds):
            job.devices_wanted_since = None
            if job.attempts:  # it trained already: keep what it did
                transition(job, PAUSED)
                add_event(session, job.id, f"Paused: no worker that takes jobs on {job.devices} devices came within "
                          f"{wait_seconds:g} s (JOB_DEVICES_WAIT_SECONDS; the most any live worker takes: {largest}). "
                          f"It keeps its checkpoints: resume it with fewer devices (POST /v1/jobs/{job.id}/resume with "
                          f'{{"devices": {largest}}}), or once such a worker is live.', level="warning",
                          data={"status": PAUSED, "devices": job.devices, "largest_worker": largest})
                done.paused.append(job.id)
                continue
            _end_job(session, job, FAILED, error={
                "code": "devices_unavailable",
                "message": f"No worker that takes jobs on {job.devices} devices came within {wait_seconds:g} s "
                           f"(JOB_DEVICES_WAIT_SECONDS); the most any live worker takes is {largest}. Submit the job "
                           f"with devices {floor} or fewer, or start a worker with WORKER_DEVICES={job.devices}.",
                "param": "devices"})
            done.failed.append(job.id)
    fitting = session.scalars(select(Job.id).where(Job.status == QUEUED, Job.devices <= floor,
                                                   Job.devices_wanted_since.is_not(None))).all()
    for job_id in fitting:
        job = _lock_job(session, job_id)
        if job is None or job.devices_wanted_since is None:
            continue
        job.devices_wanted_since = None
        add_event(session, job.id, f"A worker that takes jobs on {job.devices} devices is live: the job runs when it "
                  "is free", data={"devices": job.devices, "largest_worker": largest})
        done.fitting.append(job.id)
    return done
