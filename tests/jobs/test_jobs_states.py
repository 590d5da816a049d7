from __future__ import annotations

import itertools

import pytest

from jobs.errors import Conflict
from jobs.models import Job
from jobs.states import ALLOWED, STATUSES, TERMINAL, InvalidTransition, can_transition, transition

EXPECTED = {
    ("queued", "running"),
    ("queued", "cancelled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelling"),
    ("running", "queued"),
    ("cancelling", "cancelled"),
    ("cancelling", "succeeded"),
    ("cancelling", "failed"),
    ("queued", "paused"),
    ("queued", "failed"),  # no live worker has the devices it asks for (jobs.placement)
    ("running", "pausing"),
    ("pausing", "paused"),
    ("pausing", "cancelling"),
    ("pausing", "succeeded"),
    ("pausing", "failed"),
    ("paused", "queued"),
    ("paused", "cancelled"),
}


def job_in(status: str) -> Job:
    return Job(id="job-test", owner="o", type="train", status=status, params={})


def test_the_allowed_transitions_are_exactly_the_documented_ones():
    allowed = {(a, b) for a, b in itertools.product(STATUSES, STATUSES) if can_transition(a, b)}
    assert allowed == EXPECTED
    assert set(ALLOWED) == set(STATUSES)


def test_terminal_states_have_no_way_out():
    assert TERMINAL == {"succeeded", "failed", "cancelled"}
    assert all(not ALLOWED[s] for s in TERMINAL)


@pytest.mark.parametrize("current,new", sorted(set(itertools.product(STATUSES, STATUSES)) - EXPECTED))
def test_every_other_transition_raises(current, new):
    job = job_in(current)
    with pytest.raises(InvalidTransition) as raised:
        transition(job, new)
    assert job.status == current
    assert isinstance(raised.value, Conflict)
    assert raised.value.code == "invalid_transition"


def test_transition_stamps_start_and_finish():
    job = job_in("queued")
    transition(job, "running")
    started = job.started_at
    assert started is not None and started.tzinfo is not None and job.finished_at is None
    transition(job, "queued")  # redelivered
    transition(job, "running")
    assert job.started_at == started  # the first start counts
    transition(job, "cancelling")
    assert job.finished_at is None
    transition(job, "cancelled")
    assert job.finished_at is not None and job.finished_at >= started
