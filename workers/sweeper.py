"""The sweeper: a thread in every worker's main process that runs the database's recovery pass (jobs.recovery)
every half lease, and once at start, so a worker that starts after an outage picks up what was lost at once:
jobs whose worker died go back to the queue (or fail after JOB_MAX_ATTEMPTS lost workers), shards whose worker
died go back to the pool, and queued jobs with no message waiting in the broker get one. It also expires batches
past their completion window and writes the output files of batches whose job has ended (jobs.batches). Every
workers.cleanup.INTERVAL_SECONDS it also removes artifacts nothing refers to (workers.cleanup).

After a pass that could not reach the database, the next pass waits until the database has answered for one
lease: during the outage no worker could renew its lease or claim the job whose message it holds, and those
workers are most likely alive and about to.
"""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import text
from dataclasses import dataclass, field

from jobs import placement, recovery
from jobs.batch_output import BatchSweep, sweep_batches
from jobs.errors import BrokerUnavailable
from jobs.queue import enqueue, waiting_job_ids

from . import cleanup
from .devices import worker_devices
from .runtime import SHUTTING_DOWN, Runtime, is_infrastructure_error

#: The queues this worker consumes (set when it is ready: workers.app), None until then.
CONSUMED_QUEUES: list[str] | None = None


def takes_devices(devices: int, queues: list[str] | None) -> int:
    """The most devices of a training job this worker takes: its devices, unless the queues it consumes
    (--queues) stop short of them ("train" 1, "train-N" N; 0 without a training queue)."""
    if queues is None:
        return devices
    counts = [1 if name == "train" else int(name.removeprefix("train-")) for name in queues
              if name == "train" or (name.startswith("train-") and name.removeprefix("train-").isdigit())]
    return min(devices, max(counts, default=0))

log = logging.getLogger("workers.sweeper")


@dataclass
class Sweep:
    """What one pass did: job ids requeued after a lost worker, (job, shard) pairs returned to the pool, job ids
    sent a new message, and the batches expired and finalized."""

    requeued: list[str] = field(default_factory=list)
    shards: list[tuple[str, int]] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)
    batches: BatchSweep = field(default_factory=BatchSweep)


def sweep(rt: Runtime) -> Sweep:
    """One recovery pass (see the module docstring); database errors propagate, a broker error ends the dispatch
    step until the next pass."""
    settings = rt.settings
    done = Sweep()
    with rt.transaction() as session:
        lost = recovery.lost_jobs(session)
    for job_id in lost:
        with rt.transaction() as session:
            if recovery.recover_lost_job(session, job_id, settings.job_max_attempts):
                done.requeued.append(job_id)
        log.warning("job %s: its worker stopped renewing the lease", job_id)
    with rt.transaction() as session:
        shards = recovery.lost_shards(session)

    for job_id, index in shards:
        with rt.transaction() as session:
            if recovery.recover_lost_shard(session, job_id, index, settings.job_max_attempts):
                done.shards.append((job_id, index))
        log.warning("job %s: shard %d's worker stopped renewing its lease", job_id, index)

    devices = worker_devices(settings)  # this worker is live, with the training jobs it takes; jobs no live
    if not SHUTTING_DOWN.is_set():  # worker takes are told so, and fail (or pause) after JOB_DEVICES_WAIT_SECONDS
        with rt.transaction() as session:
            placement.record_worker(session, rt.worker_id, takes_devices(devices.count, CONSUMED_QUEUES),
                                    devices.type, settings.job_lease_seconds)
    with rt.transaction() as session:
        placed = placement.check_placement(session, settings.job_lease_seconds, settings.job_devices_wait_seconds)
    for job_id in placed.failed:
        log.warning("job %s: no worker with its devices came; failed", job_id)

    # After the jobs' recovery: a job it cancelled (a cancelling job whose worker died) is finalized in this pass.
    done.batches = sweep_batches(rt.sessions, rt.artifacts, on_error=batch_error)
    for batch_id in done.batches.expired:
        log.warning("batch %s: its completion window passed; its job stops", batch_id)

    with rt.transaction() as session:
        due = recovery.jobs_to_dispatch(session, settings.job_redispatch_seconds)
    if not due:
        return done
    # A message a worker took within the last lease counts as waiting: it claims the job, or puts the message back.
    waiting = waiting_job_ids(rt.celery, taken_within=settings.job_lease_seconds)
    for job_id, job_type, devices in due:
        if waiting is not None and job_id in waiting:
            continue  # its message waits for a free worker: one is enough
        if job_id in done.requeued:
            message = "Sent to the queue for another worker"
        elif waiting is None:
            message = (f"Sent to the queue again: {settings.job_redispatch_seconds} s after its last message no worker "
                       "has taken it (this broker cannot be looked into; an extra delivery does nothing)")
        else:
            message = ("Sent to the queue again: no message for it was waiting in the broker (the broker lost it, "
                       "or it was never sent)")
        try:
            with rt.transaction() as session:
                if not recovery.mark_dispatched(session, job_id, settings.job_redispatch_seconds, message):
                    continue
                enqueue(rt.celery, job_type, job_id, devices)  # in the transaction: a failed send leaves the job due
        except BrokerUnavailable as exc:
            log.warning("could not send job %s again: %s; trying on the next pass", job_id, exc)
            break
        log.warning("job %s: %s", job_id, message)
        done.dispatched.append(job_id)
    return done


def batch_error(batch_id: str, exc: Exception) -> None:
    """One batch could not be expired or finalized: a database or broker outage ends the pass (as for jobs);
    anything else is logged, and the next pass tries that batch again while the others go on."""
    if is_infrastructure_error(exc):
        raise exc
    log.warning("batch %s: could not be expired or finalized; trying again on the next pass", batch_id, exc_info=exc)


def start_sweeper(rt: Runtime) -> threading.Event:
    """Run sweep() on a daemon thread now and every half lease until the returned event is set."""
    stop = threading.Event()
    interval = rt.settings.job_lease_seconds / 2
    grace = rt.settings.job_lease_seconds

    def loop() -> None:
        back_since: float | None = time.monotonic() - grace  # when the database last started answering
        next_collection = time.monotonic() + cleanup.INTERVAL_SECONDS / 10  # not while the worker starts up
        while True:
            if back_since is not None and time.monotonic() - back_since >= grace:
                try:
                    sweep(rt)
                except Exception as exc:  # the database is away: wait until it has answered for a lease
                    back_since = None
                    log.warning("sweep failed (%s); trying again when the database has answered for %d s",
                                type(exc).__name__, rt.settings.job_lease_seconds)
            else:
                try:  # is it back? (the wait for a lease starts at the first answer)
                    with rt.transaction() as session:
                        session.execute(text("SELECT 1"))
                    back_since = back_since or time.monotonic()
                except Exception:
                    back_since = None
            if time.monotonic() >= next_collection:
                next_collection = time.monotonic() + cleanup.INTERVAL_SECONDS
                try:
                    removed = cleanup.collect_garbage(rt)
                    if any(removed.values()):
                        log.info("garbage collection removed %s", removed)
                except Exception:
                    log.warning("garbage collection failed; trying again later", exc_info=True)
            if stop.wait(interval):
                return

    threading.Thread(target=loop, name="sweeper", daemon=True).start()
    return stop
