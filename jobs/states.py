"""The job state machine.

queued -> running | cancelled
running -> succeeded | failed | cancelling | queued   (queued: its worker died, shut down or lost the database;
                                                       the job waits for the next worker and resumes)
cancelling -> cancelled | succeeded | failed          (the worker may finish before it notices the cancel)
queued -> paused                                      (paused before a worker took it)
queued -> failed                                      (no live worker has the devices it asks for, for
                                                       JOB_DEVICES_WAIT_SECONDS: jobs.placement)
running -> pausing -> paused                          (its worker writes a checkpoint, or its generation shards
                                                       finish, and frees itself)
pausing -> cancelling | succeeded | failed            (cancelled while pausing; or the run ended first)
paused -> queued | cancelled                          (resumed: it continues from where it paused)
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from jobs.errors import Conflict

if TYPE_CHECKING:
    from jobs.models import Job

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
PAUSING = "pausing"
PAUSED = "paused"

STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED, PAUSING, PAUSED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ALLOWED: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, PAUSED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLING, QUEUED, PAUSING}),
    CANCELLING: frozenset({CANCELLED, SUCCEEDED, FAILED}),
    PAUSING: frozenset({PAUSED, CANCELLING, SUCCEEDED, FAILED}),
    PAUSED: frozenset({QUEUED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class InvalidTransition(Conflict):
    code = "invalid_transition"

    def __init__(self, current: str, new: str) -> None:
        super().__init__(f"A job cannot go from {current!r} to {new!r}", param="status")
        self.current = current
        self.new = new


def can_transition(current: str, new: str) -> bool:
    return new in ALLOWED.get(current, frozenset())


def transition(job: "Job", new_status: str) -> None:
    """Move `job` to `new_status`, stamping started_at on the first start and finished_at on a terminal state."""
    if not can_transition(job.status, new_status):
        raise InvalidTransition(job.status, new_status)
    now = datetime.now(timezone.utc)
    job.status = new_status
    if new_status == RUNNING and job.started_at is None:
        job.started_at = now
    if new_status in TERMINAL:
        job.finished_at = now
