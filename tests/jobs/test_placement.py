"""Placement (jobs.placement) on SQLite and PostgreSQL: live workers and their devices, and the queued jobs that
ask for more devices than any live worker has: told at once, failed after the wait, untold when one comes.

Each test runs at a time of its own (the workers table is shared by the tests of a database)."""
from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone

import pytest

from jobs import placement
from jobs import repository as repo
from jobs.db import session_scope

from .test_jobs_execution import blob, events, load

LEASE = 60
WAIT = 600


@pytest.fixture
def now() -> datetime:
    return datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(hours=secrets.randbelow(10**6))


def seen(sessions, worker: str, devices: int, when: datetime) -> None:
    with session_scope(sessions) as s:
        placement.record_worker(s, worker, devices, "cuda", LEASE, now=when)


def check(sessions, when: datetime) -> placement.Placement:
    with session_scope(sessions) as s:
        return placement.check_placement(s, LEASE, WAIT, now=when)


def job_on(sessions, owner: str, devices: int) -> str:
    with session_scope(sessions) as s:
        file_id = repo.create_file(s, owner, "train", "data.txt", blob(b"text\n"), records=1).id
        job, _ = repo.create_job(s, owner, "train", {"max_steps": 10, "devices": devices}, training_file_id=file_id,
                                 devices=devices)
        return job.id


def test_the_largest_live_worker_counts_workers_seen_within_a_lease(sessions, now):
    a, b = f"a-{secrets.token_hex(4)}", f"b-{secrets.token_hex(4)}"
    with session_scope(sessions) as s:
        assert placement.largest_live_worker(s, LEASE, now=now) is None
    seen(sessions, a, 2, now)
    seen(sessions, b, 8, now - timedelta(seconds=LEASE + 1))  # not seen within the last lease
    with session_scope(sessions) as s:
        assert placement.largest_live_worker(s, LEASE, now=now) == 2
    seen(sessions, b, 8, now)
    with session_scope(sessions) as s:
        assert placement.largest_live_worker(s, LEASE, now=now) == 8
        placement.forget_worker(s, b)
        assert placement.largest_live_worker(s, LEASE, now=now) == 2


def test_a_job_no_live_worker_fits_is_told_then_fails_after_the_wait(sessions, owner, now):
    seen(sessions, f"w-{secrets.token_hex(4)}", 2, now)
    big, small = job_on(sessions, owner, 4), job_on(sessions, owner, 2)
    done = check(sessions, now)
    assert big in done.told and small not in done.told
    told = events(sessions, big)[-1]
    assert told.level == "warning" and told.message.startswith("No live worker takes jobs on 4 devices (the most any takes: 2)")
    assert check(sessions, now + timedelta(seconds=30)).told == []  # told once
    seen(sessions, f"w-{secrets.token_hex(4)}", 2, now + timedelta(seconds=WAIT))
    assert big in check(sessions, now + timedelta(seconds=WAIT)).failed
    job = load(sessions, big)
    assert job.status == "failed" and job.error["code"] == "devices_unavailable" and job.error["param"] == "devices"
    assert load(sessions, small).status == "queued"


def test_a_waiting_job_is_untold_when_a_big_enough_worker_comes(sessions, owner, now):
    seen(sessions, f"w-{secrets.token_hex(4)}", 1, now)
    job_id = job_on(sessions, owner, 4)
    assert job_id in check(sessions, now).told
    seen(sessions, f"big-{secrets.token_hex(4)}", 4, now + timedelta(seconds=10))
    assert job_id in check(sessions, now + timedelta(seconds=10)).fitting
    job = load(sessions, job_id)
    assert job.status == "queued" and job.devices_wanted_since is None
    assert events(sessions, job_id)[-1].message.startswith("A worker that takes jobs on 4 devices is live")


def test_a_job_that_trained_already_is_paused_not_failed_after_the_wait(sessions, owner, now):
    from jobs.models import Job

    seen(sessions, f"w-{secrets.token_hex(4)}", 1, now)
    job_id = job_on(sessions, owner, 2)
    with session_scope(sessions) as s:
        s.get(Job, job_id).attempts = 1  # it ran on a two-device worker that is gone now
    assert job_id in check(sessions, now).told
    assert "is paused (keeping its checkpoints)" in events(sessions, job_id)[-1].message
    seen(sessions, f"w-{secrets.token_hex(4)}", 1, now + timedelta(seconds=WAIT))
    assert job_id in check(sessions, now + timedelta(seconds=WAIT)).paused
    job = load(sessions, job_id)
    assert job.status == "paused" and job.error is None
    assert '{"devices": 1}' in events(sessions, job_id)[-1].message


def test_a_one_device_job_is_never_judged_and_a_worker_without_training_queues_takes_none(sessions, owner, now):
    seen(sessions, f"generate-only-{secrets.token_hex(4)}", 0, now)
    one, two = job_on(sessions, owner, 1), job_on(sessions, owner, 2)
    done = check(sessions, now)
    assert one not in done.told and two in done.told


def test_nothing_is_said_while_no_worker_is_live(sessions, owner, now):
    job_id = job_on(sessions, owner, 4)
    assert check(sessions, now) == placement.Placement([], [], [], [])
    assert load(sessions, job_id).devices_wanted_since is None
