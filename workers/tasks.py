"""Tasks, registered under the names in ``jobs.queue.TASK_NAMES``; each takes only a job id.

The real bodies (training, fine-tuning, generation through gpt2core) land with the workers issue. Until then
each task only logs that it received the job and returns: it does not touch the job's state, so running it
any number of times is harmless, and a job enqueued now stays queued in the database for the real worker.
"""
from __future__ import annotations

import logging

from jobs.queue import TASK_NAMES
from workers.app import app

log = logging.getLogger("workers.tasks")


def _received(job_type: str, job_id: str) -> None:
    log.info("received job %s (%s)", job_id, job_type)


@app.task(name=TASK_NAMES["train"])
def train(job_id: str) -> None:
    """Train a GPT-2 from scratch for job ``job_id``."""
    _received("train", job_id)


@app.task(name=TASK_NAMES["finetune"])
def finetune(job_id: str) -> None:
    """Fine-tune a GPT-2 checkpoint for job ``job_id``."""
    _received("finetune", job_id)


@app.task(name=TASK_NAMES["generate"])
def generate(job_id: str) -> None:
    """Bulk-generate completions for job ``job_id``."""
    _received("generate", job_id)
