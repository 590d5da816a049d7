"""The sweeper: every worker's main process looks, every half lease, for jobs whose worker stopped renewing its
lease (it died, or its machine did) and sends them a new message, so another worker resumes them at once rather
than after the broker's visibility timeout."""
from __future__ import annotations

import logging
import threading

from jobs import execution
from jobs.queue import enqueue

from .runtime import Runtime

log = logging.getLogger("workers.sweeper")


def sweep(rt: Runtime) -> list[str]:
    """Requeue every stale job once; returns their ids."""
    lease_seconds = rt.settings.job_lease_seconds
    with rt.transaction() as session:
        stale = execution.stale_jobs(session)
    requeued = []
    for job_id, job_type in stale:
        with rt.transaction() as session:
            if not execution.mark_requeued(session, job_id, lease_seconds):
                continue
        enqueue(rt.celery, job_type, job_id)
        log.warning("job %s: its worker stopped renewing the lease; sent it to another worker", job_id)
        requeued.append(job_id)
    return requeued


def start_sweeper(rt: Runtime) -> threading.Event:
    """Run sweep() on a daemon thread every half lease until the returned event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(rt.settings.job_lease_seconds / 2):
            try:
                sweep(rt)
            except Exception:  # the database or broker is away: try again next round
                log.exception("sweep failed")

    threading.Thread(target=loop, name="sweeper", daemon=True).start()
    return stop
