"""Tasks, registered under the names in ``jobs.queue.TASK_NAMES``; each takes only a job id.

Every task re-reads the job from the database and is safe to run any number of times: a delivery whose job is
finished, cancelled or held under a live lease by another worker does nothing. Failures end the job ``failed``
in the database; nothing is raised to Celery (its result backend is not used). The one exception: when the
database or the broker cannot be reached, the job is not the problem, so the message goes back to its queue
(after a pause, so an outage is not a busy loop) for a later delivery; the database's reconciliation
(jobs.recovery) covers a message lost meanwhile.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from celery.exceptions import Reject

from jobs.queue import TASK_NAMES
from workers.app import app
from workers.runtime import ACTIVE_JOBS, Runtime, is_infrastructure_error, runtime

log = logging.getLogger("workers")

#: Seconds a worker waits, after the database or broker failed a delivery, before putting its message back.
INFRASTRUCTURE_PAUSE = 2.0


def deliver(run: Callable[[Runtime, str], None], job_id: str) -> None:
    """Run one delivery of job `job_id`; a database or broker outage puts its message back (see above)."""
    from workers.app import listen_for_hand_back
    from workers.runtime import SHUTTING_DOWN

    listen_for_hand_back()
    if SHUTTING_DOWN.is_set():  # a message taken during a warm shutdown goes back for another worker
        log.info("job %s: this worker is shutting down; its message goes back to the queue", job_id)
        raise Reject("the worker is shutting down", requeue=True)
    ACTIVE_JOBS.add(job_id)
    try:
        run(runtime(), job_id)
    except Exception as exc:
        if not is_infrastructure_error(exc):
            raise
        log.warning("job %s: database or broker unreachable (%s); its message goes back to the queue in %.0f s",
                    job_id, type(exc).__name__, INFRASTRUCTURE_PAUSE)
        time.sleep(INFRASTRUCTURE_PAUSE)
        raise Reject(exc, requeue=True) from exc
    finally:
        ACTIVE_JOBS.discard(job_id)


@app.task(name=TASK_NAMES["train"])
def train(job_id: str) -> None:
    """Train a GPT-2 from scratch for job ``job_id``."""
    from workers.training import run_training

    deliver(run_training, job_id)


@app.task(name=TASK_NAMES["finetune"])
def finetune(job_id: str) -> None:
    """Fine-tune a registered model for job ``job_id``."""
    from workers.training import run_training

    deliver(run_training, job_id)


@app.task(name=TASK_NAMES["generate"])
def generate(job_id: str) -> None:
    """Bulk-generate completions for job ``job_id`` (or help with its shards)."""
    from workers.generation import run_generation

    deliver(run_generation, job_id)
