"""Pausing and resuming jobs in the database (repository, execution, shards, recovery), on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from jobs import execution as ex
from jobs import recovery
from jobs import repository as repo
from jobs import shards as sh
from jobs.db import session_scope
from jobs.errors import Conflict
from jobs.models import GenerationShard, Job, JobEvent

from .test_jobs_execution import LEASE, at, claim, load, new_job


def pause(sessions, owner, job_id) -> Job:
    with session_scope(sessions) as s:
        return repo.pause_job(s, owner, job_id)


def resume(sessions, owner, job_id) -> Job:
    with session_scope(sessions) as s:
        return repo.resume_job(s, owner, job_id)


def statuses_in_events(sessions, job_id: str) -> list[str]:
    with session_scope(sessions) as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return [e.data["status"] for e in rows if e.data and "status" in e.data]


def test_a_queued_job_pauses_at_once_and_a_worker_leaves_it_alone(sessions, owner):
    job_id = new_job(sessions, owner)
    assert pause(sessions, owner, job_id).status == "paused"
    assert claim(sessions, job_id, "w1", at(0)) is None  # its message arrives anyway
    assert load(sessions, job_id).status == "paused"
    assert pause(sessions, owner, job_id).status == "paused"  # pausing again changes nothing
    job = resume(sessions, owner, job_id)
    assert job.status == "queued" and job.dispatched_at is not None
    assert claim(sessions, job_id, "w1", at(0)).status == "running"
    assert statuses_in_events(sessions, job_id) == ["paused", "queued"]


def test_a_running_job_is_pausing_until_its_worker_stops(sessions, owner):
    job_id = new_job(sessions, owner)
    claim(sessions, job_id, "w1", at(0))
    assert pause(sessions, owner, job_id).status == "pausing"
    with session_scope(sessions) as s:
        assert ex.renew_lease(s, job_id, "w1", LEASE, now=at(1)) == "pausing"
        ex.pause(s, job_id, "w1", "Job paused at step 7")
    job = load(sessions, job_id)
    assert job.status == "paused" and job.lease_owner is None and job.finished_at is None
    with pytest.raises(Conflict):  # a resumed job cannot be resumed twice
        resume(sessions, owner, job_id)
        resume(sessions, owner, job_id)
    assert statuses_in_events(sessions, job_id) == ["pausing", "paused", "queued"]


@pytest.mark.parametrize("status", ["cancelling", "succeeded", "failed", "cancelled"])
def test_pause_is_a_conflict_once_cancelling_or_finished(sessions, owner, status):
    job_id = new_job(sessions, owner)
    with session_scope(sessions) as s:
        s.get(Job, job_id).status = status
    with pytest.raises(Conflict):
        pause(sessions, owner, job_id)


@pytest.mark.parametrize("status", ["queued", "running", "pausing", "cancelling", "succeeded"])
def test_resume_is_a_conflict_unless_paused(sessions, owner, status):
    job_id = new_job(sessions, owner)
    with session_scope(sessions) as s:
        s.get(Job, job_id).status = status
    with pytest.raises(Conflict) as raised:
        resume(sessions, owner, job_id)
    assert status in raised.value.message


def test_cancel_reaches_pausing_and_paused_jobs(sessions, owner):
    pausing, paused = new_job(sessions, owner), new_job(sessions, owner)
    claim(sessions, pausing, "w1", at(0))
    pause(sessions, owner, pausing)
    pause(sessions, owner, paused)
    with session_scope(sessions) as s:
        assert repo.cancel_job(s, owner, pausing).status == "cancelling"
        assert repo.cancel_job(s, owner, paused).status == "cancelled"
    with session_scope(sessions) as s:  # the worker stops for its pause, and sees the cancel
        assert ex.pause(s, pausing, "w1", "paused").status == "cancelled"


def test_a_pausing_job_whose_worker_is_gone_is_paused(sessions, owner):
    job_id = new_job(sessions, owner)
    claim(sessions, job_id, "w1", at(0))
    pause(sessions, owner, job_id)
    with session_scope(sessions) as s:
        assert job_id in recovery.lost_jobs(s, now=at(LEASE + 1), limit=10_000)
        assert recovery.recover_lost_job(s, job_id, max_attempts=3, now=at(LEASE + 1)) is False
    job = load(sessions, job_id)
    assert job.status == "paused" and job.workers_lost == 0


def test_a_pausing_job_handed_back_at_shutdown_is_paused(sessions, owner):
    job_id = new_job(sessions, owner)
    claim(sessions, job_id, "w1", at(0))
    pause(sessions, owner, job_id)
    with session_scope(sessions) as s:
        assert ex.hand_back(s, job_id, "w1", "the worker is shutting down") is False
    assert load(sessions, job_id).status == "paused"


def test_a_pausing_generate_job_takes_no_new_shard_and_keeps_its_results(sessions, owner):
    job_id = new_job(sessions, owner, "generate")
    claim(sessions, job_id, "w1", at(0))
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, total=4, shard_size=2)
        first = sh.claim_shard(s, job_id, "w1", LEASE, now=at(0)).index
    pause(sessions, owner, job_id)
    with session_scope(sessions) as s:
        assert sh.claim_shard(s, job_id, "w2", LEASE, now=at(1)) is None  # no new shard
        # the shard being generated is still running under its live lease: not paused yet
        assert sh.finish_generation(s, job_id, now=at(1)) is None
    assert load(sessions, job_id).status == "pausing"
    with session_scope(sessions) as s:
        results = [{"index": i, "prompt": f"p{i}", "completions": [{"text": "x"}], "usage": {}} for i in (0, 1)]
        sh.complete_shard(s, job_id, first, "w1", results)
        assert sh.finish_generation(s, job_id, now=at(2)).status == "paused"
    job = load(sessions, job_id)
    assert job.progress["completed"] == 2 and job.lease_owner is None
    resume(sessions, owner, job_id)
    assert claim(sessions, job_id, "w3", at(2)).status == "running"
    with session_scope(sessions) as s:
        assert sh.plan_shards(s, job_id, total=4, shard_size=2) == 2  # the plan stays
        assert sh.claim_shard(s, job_id, "w3", LEASE, now=at(2)).index == 1  # the rest goes on
        done = s.scalars(select(GenerationShard.status).where(GenerationShard.job_id == job_id)
                         .order_by(GenerationShard.index)).all()
    assert done == ["done", "running"]


def paused_training_job(sessions, owner, params: dict) -> str:
    from .test_jobs_execution import blob

    with session_scope(sessions) as s:
        file_id = repo.create_file(s, owner, "train", "data.txt", blob(b"text\n"), records=1).id
        job, _ = repo.create_job(s, owner, "train", {"devices": 2, **params},
                                 training_file_id=file_id, devices=2)
        job.status = "paused"
        return job.id


def test_a_paused_training_job_resumes_on_other_devices_when_its_batch_splits(sessions, owner):
    job_id = paused_training_job(sessions, owner, {"hyperparameters": {"max_steps": 10, "batch_size": 4}})
    with session_scope(sessions) as s:
        job = repo.resume_job(s, owner, job_id, devices=1)
        assert (job.status, job.devices, job.params["devices"]) == ("queued", 1, 1)
    last = [e for e in events_of(sessions, job_id)][-1]
    assert last.message == "Resume requested on 1 device (it was on 2): the job is back in the queue"
    assert last.data == {"status": "queued", "devices": 1}


def test_resuming_on_devices_the_batch_does_not_split_across_is_refused(sessions, owner):
    from jobs.errors import InvalidRequest

    job_id = paused_training_job(sessions, owner, {"hyperparameters": {"max_steps": 10, "batch_size": 4}})
    with pytest.raises(InvalidRequest) as refused, session_scope(sessions) as s:
        repo.resume_job(s, owner, job_id, devices=3)
    assert refused.value.param == "devices" and "does not split evenly across 3 devices" in refused.value.message
    assert load(sessions, job_id).status == "paused"


def events_of(sessions, job_id: str) -> list[JobEvent]:
    with session_scope(sessions) as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
