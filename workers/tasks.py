"""Tasks, registered under the names in ``jobs.queue.TASK_NAMES``; each takes only a job id.

Every task re-reads the job from the database and is safe to run any number of times: a delivery whose job is
finished, cancelled or held under a live lease by another worker does nothing. Failures end the job ``failed``
in the database; nothing is raised to Celery (its result backend is not used).
"""
from __future__ import annotations

from jobs.queue import TASK_NAMES
from workers.app import app
from workers.runtime import runtime


@app.task(name=TASK_NAMES["train"])
def train(job_id: str) -> None:
    """Train a GPT-2 from scratch for job ``job_id``."""
    from workers.training import run_training

    run_training(runtime(), job_id)


@app.task(name=TASK_NAMES["finetune"])
def finetune(job_id: str) -> None:
    """Fine-tune a registered model for job ``job_id``."""
    from workers.training import run_training

    run_training(runtime(), job_id)


@app.task(name=TASK_NAMES["generate"])
def generate(job_id: str) -> None:
    """Bulk-generate completions for job ``job_id`` (or help with its shards)."""
    from workers.generation import run_generation

    run_generation(runtime(), job_id)
