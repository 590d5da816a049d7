"""Recovery from the database (jobs.recovery) on SQLite and PostgreSQL: lost workers, lost shards, lost messages.

Time is controlled through the `now` parameters. The queries see every test's jobs (the database is shared), so
their results are checked for this test's jobs only.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from jobs import execution as ex
from jobs import shards as sh
from jobs import recovery
from jobs import repository as repo
from jobs.db import session_scope
from jobs.models import GenerationShard, Job

from .test_jobs_execution import LEASE, at, claim, events, load, new_job, running_job

ALL = 100_000  # a limit that sees every job in the shared database
REDISPATCH = 30


def lost(sessions, now: datetime) -> list[str]:
    with session_scope(sessions) as s:
        return recovery.lost_jobs(s, now=now, limit=ALL)


def recover(sessions, job_id: str, now: datetime, max_attempts: int = 3) -> bool:
    with session_scope(sessions) as s:
        return recovery.recover_lost_job(s, job_id, max_attempts, now=now)


def due(sessions, now: datetime) -> list[str]:
    with session_scope(sessions) as s:
        return [job_id for job_id, _, _ in recovery.jobs_to_dispatch(s, REDISPATCH, now=now, limit=ALL)]


def dispatch(sessions, job_id: str, now: datetime) -> bool:
    with session_scope(sessions) as s:
        return recovery.mark_dispatched(s, job_id, REDISPATCH, "Sent to the queue again", now=now)


# Lost workers


def test_a_job_whose_worker_is_lost_waits_in_the_queue_and_is_due_for_a_message(sessions, owner):
    job_id = running_job(sessions, owner)
    assert job_id not in lost(sessions, at(LEASE - 1))
    assert job_id in lost(sessions, at(LEASE + 1))
    assert recover(sessions, job_id, at(LEASE + 1))
    job = load(sessions, job_id)
    # Waiting for a worker shows as waiting: queued, no lease owner, its progress kept.
    assert (job.status, job.lease_owner, job.lease_expires_at, job.workers_lost, job.attempts) == (
        "queued", None, None, 1, 1)
    assert events(sessions, job_id)[-1].data == {"attempt": 1, "worker": "w1", "workers_lost": 1}
    assert job_id not in lost(sessions, at(10_000))
    assert not recover(sessions, job_id, at(LEASE + 2))  # nothing to do twice
    # Its message was consumed by the lost worker: it is due for a new one at once.
    assert job.dispatched_at is None and job_id in due(sessions, datetime.now(timezone.utc))


def test_a_worker_that_renewed_meanwhile_keeps_its_job(sessions, owner):
    job_id = running_job(sessions, owner)
    assert job_id in lost(sessions, at(LEASE + 1))
    with session_scope(sessions) as s:
        ex.renew_lease(s, job_id, "w1", LEASE, now=at(LEASE + 1))
    assert not recover(sessions, job_id, at(LEASE + 2))
    assert not recover(sessions, "job-doesnotexist", at(LEASE + 2))
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.workers_lost) == ("running", "w1", 0)


def test_a_poison_job_fails_after_max_attempts_lost_workers(sessions, owner):
    job_id = running_job(sessions, owner, worker="w1")
    t = LEASE + 1
    for worker in ("w2", "w3"):
        assert recover(sessions, job_id, at(t), max_attempts=3)
        assert claim(sessions, job_id, worker, at(t)) is not None
        t += LEASE + 1
    assert not recover(sessions, job_id, at(t), max_attempts=3)
    job = load(sessions, job_id)
    assert (job.status, job.attempts, job.workers_lost, job.error["code"]) == ("failed", 3, 3, "worker_lost")
    attempts = [e.data for e in events(sessions, job_id) if e.message.startswith("Attempt ")]
    assert [(a["attempt"], a["worker"]) for a in attempts] == [(1, "w1"), (2, "w2"), (3, "w3")]
    assert job_id not in due(sessions, datetime.now(timezone.utc) + timedelta(days=1))


def test_a_cancelling_job_whose_worker_is_lost_is_cancelled(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        repo.cancel_job(s, owner, job_id)
    assert job_id in lost(sessions, at(LEASE + 1))
    assert not recover(sessions, job_id, at(LEASE + 1))
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.workers_lost) == ("cancelled", None, 0)


def test_finished_and_queued_jobs_are_never_lost(sessions, owner):
    queued = new_job(sessions, owner)
    finished = running_job(sessions, owner)
    with session_scope(sessions) as s:
        ex.finish_job(s, finished, "w1", "succeeded")
    assert queued not in lost(sessions, at(10_000)) and finished not in lost(sessions, at(10_000))
    assert not recover(sessions, finished, at(10_000)) and not recover(sessions, queued, at(10_000))


# Lost shards


def shards(sessions, job_id: str) -> list[GenerationShard]:
    with session_scope(sessions) as s:
        return list(s.query(GenerationShard).filter_by(job_id=job_id).order_by(GenerationShard.index))


def lost_shards(sessions, job_id: str, now: datetime) -> list[int]:
    with session_scope(sessions) as s:
        return [index for job, index in recovery.lost_shards(s, now=now, limit=ALL) if job == job_id]


def test_a_shard_whose_worker_is_lost_goes_back_to_the_pool(sessions, owner):
    job_id = running_job(sessions, owner, "coordinator", type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 6, 2)
        sh.claim_shard(s, job_id, "helper", LEASE, now=at(1))
        ex.renew_lease(s, job_id, "coordinator", 10 * LEASE, now=at(2))  # the job's own worker lives
    assert lost_shards(sessions, job_id, at(LEASE)) == []
    assert lost_shards(sessions, job_id, at(LEASE + 2)) == [0]
    with session_scope(sessions) as s:
        assert recovery.recover_lost_shard(s, job_id, 0, 3, now=at(LEASE + 2))
        assert not recovery.recover_lost_shard(s, job_id, 0, 3, now=at(LEASE + 3))
    first = shards(sessions, job_id)[0]
    assert (first.status, first.lease_owner, first.attempts) == ("pending", None, 1)
    assert load(sessions, job_id).lease_owner == "coordinator"
    assert "Shard 0: attempt 1 ended without a word from worker helper" in events(sessions, job_id)[-1].message
    # A job whose own worker is gone is recovered as a whole, not shard by shard.
    assert lost_shards(sessions, job_id, at(20 * LEASE)) == []


def test_a_shard_that_keeps_losing_its_workers_fails_the_job(sessions, owner):
    job_id = running_job(sessions, owner, "coordinator", type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 6, 2)
        ex.renew_lease(s, job_id, "coordinator", 100 * LEASE, now=at(0))
    t = 1
    for attempt in (1, 2):
        with session_scope(sessions) as s:
            assert sh.claim_shard(s, job_id, f"helper{attempt}", LEASE, now=at(t)).index == 0
            assert recovery.recover_lost_shard(s, job_id, 0, 2, now=at(t + LEASE + 1))
        t += LEASE + 2
    job = load(sessions, job_id)
    assert (job.status, job.error["code"]) == ("failed", "worker_lost")
    assert "shard 0 (prompts 0 to 1)" in job.error["message"]


# Lost messages


def test_a_queued_job_is_due_for_a_message_only_after_the_redispatch_time(sessions, owner):
    job_id = new_job(sessions, owner)
    sent_at = load(sessions, job_id).dispatched_at  # the API sends its message right after the commit
    assert sent_at is not None
    assert job_id not in due(sessions, sent_at + timedelta(seconds=REDISPATCH - 1))
    assert job_id in due(sessions, sent_at + timedelta(seconds=REDISPATCH + 1))


def test_one_message_per_redispatch_time_however_many_sweepers(sessions, owner):
    job_id = new_job(sessions, owner)
    now = load(sessions, job_id).dispatched_at + timedelta(seconds=REDISPATCH + 1)
    assert dispatch(sessions, job_id, now)
    assert not dispatch(sessions, job_id, now + timedelta(seconds=1))  # a second sweeper: already sent
    assert job_id not in due(sessions, now + timedelta(seconds=REDISPATCH - 1))
    assert load(sessions, job_id).dispatched_at == now
    assert events(sessions, job_id)[-1].message == "Sent to the queue again"
    assert dispatch(sessions, job_id, now + timedelta(seconds=REDISPATCH + 1))


def test_only_queued_jobs_are_sent_again(sessions, owner):
    running = running_job(sessions, owner)
    cancelled = new_job(sessions, owner)
    with session_scope(sessions) as s:
        repo.cancel_job(s, owner, cancelled)
    later = datetime.now(timezone.utc) + timedelta(days=1)
    assert running not in due(sessions, later) and cancelled not in due(sessions, later)
    assert not dispatch(sessions, running, later) and not dispatch(sessions, cancelled, later)
    with session_scope(sessions) as s:
        assert s.get(Job, running).status == "running"
