"""Job execution (leases, sweeper, checkpoints, models, generation shards) on SQLite and PostgreSQL.

Time is controlled through the `now` parameters. The sweeper's queries see every test's jobs (the database is
shared), so its results are checked for this test's jobs only.
"""
from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from jobs import execution as ex
from jobs import shards as sh
from jobs import repository as repo
from jobs.db import session_scope
from jobs.models import Checkpoint, GenerationResult, GenerationShard, Job, JobEvent, Model
from jobs.states import InvalidTransition
from jobs.storage import StoredBlob

LEASE = 60
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def blob(content: bytes = b'{"prompt": "hi"}\n') -> StoredBlob:
    return StoredBlob(path=Path("/artifacts/files/x"), bytes=len(content), sha256=hashlib.sha256(content).hexdigest(),
                      lines=content.count(b"\n"))


def new_job(sessions, owner: str, type: str = "train") -> str:
    purpose = "generate" if type == "generate" else "train"
    with session_scope(sessions) as s:
        file_id = repo.create_file(s, owner, purpose, "data.jsonl", blob(), records=1).id
        if type == "generate":
            job, _ = repo.create_job(s, owner, "generate", {"max_tokens": 8}, input_file_id=file_id)
        else:
            job, _ = repo.create_job(s, owner, "train", {"max_steps": 10}, training_file_id=file_id)
        return job.id


def load(sessions, job_id: str) -> Job:
    with session_scope(sessions) as s:
        return s.get(Job, job_id)


def events(sessions, job_id: str) -> list[JobEvent]:
    with session_scope(sessions) as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def claim(sessions, job_id: str, worker: str, now: datetime, **kwargs) -> Job | None:
    with session_scope(sessions) as s:
        return ex.claim_job(s, job_id, worker, LEASE, now=now, **kwargs)


def running_job(sessions, owner: str, worker: str = "w1", type: str = "train") -> str:
    job_id = new_job(sessions, owner, type)
    assert claim(sessions, job_id, worker, T0) is not None
    return job_id


# claim_job


def test_claim_starts_a_queued_job(sessions, owner):
    job_id = new_job(sessions, owner)
    job = claim(sessions, job_id, "w1", T0)
    assert (job.id, job.status, job.lease_owner, job.attempts) == (job_id, "running", "w1", 1)
    assert job.lease_expires_at == at(LEASE)
    assert job.started_at is not None and job.finished_at is None
    last = events(sessions, job_id)[-1]
    assert (last.message, last.level) == ("Started on worker w1 (attempt 1)", "info")


def test_duplicate_delivery_with_a_live_lease_changes_nothing(sessions, owner):
    job_id = running_job(sessions, owner)
    before = len(events(sessions, job_id))
    for worker in ("w2", "w1"):
        assert claim(sessions, job_id, worker, at(LEASE - 1)) is None
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.attempts, job.lease_expires_at) == ("running", "w1", 1, at(LEASE))
    assert len(events(sessions, job_id)) == before


def test_missing_and_finished_jobs_are_not_claimed(sessions, owner):
    assert claim(sessions, "job-doesnotexist", "w1", T0) is None
    cancelled = new_job(sessions, owner)
    with session_scope(sessions) as s:
        repo.cancel_job(s, owner, cancelled)
    succeeded = running_job(sessions, owner)
    with session_scope(sessions) as s:
        ex.finish_job(s, succeeded, "w1", "succeeded")
    for job_id, status in ((cancelled, "cancelled"), (succeeded, "succeeded")):
        assert claim(sessions, job_id, "w2", at(10 * LEASE)) is None
        job = load(sessions, job_id)
        assert (job.status, job.lease_owner) == (status, None)


def test_an_expired_lease_is_taken_over(sessions, owner):
    job_id = running_job(sessions, owner)
    started_at = load(sessions, job_id).started_at
    job = claim(sessions, job_id, "w2", at(LEASE + 1))
    assert (job.status, job.lease_owner, job.attempts) == ("running", "w2", 2)
    assert job.lease_expires_at == at(2 * LEASE + 1) and job.started_at == started_at
    lost, resumed = events(sessions, job_id)[-2:]
    assert lost.level == "warning" and lost.message.startswith("Attempt 1 ended without a word from worker w1")
    assert lost.data == {"attempt": 1, "worker": "w1", "workers_lost": 1}
    assert (resumed.message, resumed.data) == ("Started on worker w2 (attempt 2)", {"attempt": 2, "worker": "w2"})
    # The old worker has lost the job: everything it tries now fails and changes nothing.
    with session_scope(sessions) as s:
        with pytest.raises(ex.LeaseLost) as raised:
            ex.renew_lease(s, job_id, "w1", LEASE, now=at(LEASE + 2))
        assert (raised.value.job_id, raised.value.worker_id, raised.value.holder) == (job_id, "w1", "w2")
        with pytest.raises(ex.LeaseLost):
            ex.update_progress(s, job_id, "w1", {"step": 5}, LEASE, now=at(LEASE + 2))
        with pytest.raises(ex.LeaseLost):
            ex.finish_job(s, job_id, "w1", "succeeded", result={"x": 1})
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.progress, job.result) == ("running", "w2", None, None)


def test_max_attempts_fails_a_job_that_keeps_losing_its_worker(sessions, owner):
    job_id = running_job(sessions, owner)
    assert claim(sessions, job_id, "w2", at(LEASE + 1), max_attempts=2) is not None
    assert claim(sessions, job_id, "w3", at(3 * LEASE), max_attempts=2) is None
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.attempts, job.workers_lost) == ("failed", None, 2, 2)
    assert job.error["code"] == "worker_lost" and "JOB_MAX_ATTEMPTS=2" in job.error["message"]
    assert events(sessions, job_id)[-1].level == "error"
    lost = [e.data for e in events(sessions, job_id) if e.message.startswith("Attempt ")]
    assert lost == [{"attempt": 1, "worker": "w1", "workers_lost": 1}, {"attempt": 2, "worker": "w2", "workers_lost": 2}]


def test_a_worker_reclaims_its_own_job_after_an_interrupted_delivery(sessions, owner):
    job_id = running_job(sessions, owner)
    assert claim(sessions, job_id, "w1", at(10)) is None  # a duplicate: w1 may be running it
    job = claim(sessions, job_id, "w1", at(10), resume_own=True)  # w1 knows it is not: a delivery that failed
    assert (job.status, job.lease_owner, job.attempts, job.workers_lost) == ("running", "w1", 2, 0)
    assert "after its previous delivery was interrupted" in events(sessions, job_id)[-1].message


def test_hand_back_queues_the_job_for_another_worker(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        assert ex.hand_back(s, job_id, "w1", "Worker w1 stopped: shutting down", now=at(5))
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.dispatched_at, job.workers_lost) == ("queued", None, at(5), 0)
    assert events(sessions, job_id)[-1].message == "Worker w1 stopped: shutting down"
    with session_scope(sessions) as s:
        with pytest.raises(ex.LeaseLost):
            ex.hand_back(s, job_id, "w1", "again")
    job = claim(sessions, job_id, "w2", at(6))
    assert (job.status, job.attempts) == ("running", 2)
    assert events(sessions, job_id)[-1].message == "Started on worker w2 (attempt 2)"
    with session_scope(sessions) as s:  # a cancelling job handed back is cancelled
        repo.cancel_job(s, owner, job_id)
        assert not ex.hand_back(s, job_id, "w2", "stopping")
    assert load(sessions, job_id).status == "cancelled"


def test_cancelling_job_is_cancelled_once_its_lease_expires(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        repo.cancel_job(s, owner, job_id)
    assert claim(sessions, job_id, "w2", at(LEASE - 1)) is None  # its worker is still stopping it
    assert load(sessions, job_id).status == "cancelling"
    assert claim(sessions, job_id, "w2", at(LEASE + 1)) is None
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.lease_expires_at, job.attempts) == ("cancelled", None, None, 1)
    assert job.finished_at is not None
    assert "cancelled" in events(sessions, job_id)[-1].message


def test_claim_rejects_bad_arguments(sessions, owner):
    job_id = new_job(sessions, owner)
    with session_scope(sessions) as s:
        with pytest.raises(ValueError):
            ex.claim_job(s, job_id, "", LEASE, now=T0)
        with pytest.raises(ValueError):
            ex.claim_job(s, job_id, "w1", 0, now=T0)
        with pytest.raises(ValueError):
            ex.claim_job(s, job_id, "w1", LEASE, now=datetime(2026, 1, 1))  # naive
    assert load(sessions, job_id).status == "queued"


# renew_lease, update_progress


def test_renew_lease_extends_it_and_reports_cancellation(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        assert ex.renew_lease(s, job_id, "w1", LEASE, now=at(30)) == "running"
    assert load(sessions, job_id).lease_expires_at == at(30 + LEASE)
    with session_scope(sessions) as s:
        repo.cancel_job(s, owner, job_id)
    with session_scope(sessions) as s:
        assert ex.renew_lease(s, job_id, "w1", LEASE, now=at(40)) == "cancelling"
    with session_scope(sessions) as s:
        with pytest.raises(ex.LeaseLost):
            ex.renew_lease(s, job_id, "w2", LEASE, now=at(41))
        with pytest.raises(ex.LeaseLost):
            ex.renew_lease(s, "job-doesnotexist", "w1", LEASE, now=at(41))
    assert load(sessions, job_id).lease_expires_at == at(40 + LEASE)


def test_renew_lease_still_works_after_expiry_if_nobody_took_over(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        assert ex.renew_lease(s, job_id, "w1", LEASE, now=at(LEASE + 5)) == "running"
    assert claim(sessions, job_id, "w2", at(LEASE + 6)) is None


def test_update_progress_replaces_progress_and_renews(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        assert ex.update_progress(s, job_id, "w1", {"step": 1, "loss": 3.5}, LEASE, now=at(10)) == "running"
    with session_scope(sessions) as s:
        assert ex.update_progress(s, job_id, "w1", {"step": 2}, LEASE, now=at(20)) == "running"
        with pytest.raises(ex.LeaseLost):
            ex.update_progress(s, job_id, "w2", {"step": 99}, LEASE, now=at(21))
    job = load(sessions, job_id)
    assert job.progress == {"step": 2} and job.lease_expires_at == at(20 + LEASE)


# finish_job


def test_finish_succeeded(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        job = ex.finish_job(s, job_id, "w1", "succeeded", result={"model": "model-x"})
        assert job.status == "succeeded"
    job = load(sessions, job_id)
    assert (job.result, job.error, job.lease_owner, job.lease_expires_at) == ({"model": "model-x"}, None, None, None)
    assert job.finished_at is not None
    last = events(sessions, job_id)[-1]
    assert (last.message, last.level) == ("Job succeeded", "info")
    with session_scope(sessions) as s:  # finishing twice: the lease is gone
        with pytest.raises(ex.LeaseLost):
            ex.finish_job(s, job_id, "w1", "succeeded")


def test_finish_failed_logs_the_error(sessions, owner):
    job_id = running_job(sessions, owner)
    error = {"code": "out_of_memory", "message": "CUDA out of memory", "param": None}
    with session_scope(sessions) as s:
        ex.finish_job(s, job_id, "w1", "failed", error=error)
    job = load(sessions, job_id)
    assert (job.status, job.error, job.result) == ("failed", error, None)
    last = events(sessions, job_id)[-1]
    assert (last.level, last.data, last.message) == ("error", error, "Job failed: CUDA out of memory")


def test_finish_failed_without_an_error_still_records_one(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        ex.finish_job(s, job_id, "w1", "failed", error={"message": "bad data", "param": "training_file",
                                                        "traceback": "..."}, message="Stopped")
    job = load(sessions, job_id)
    assert job.error == {"code": "job_failed", "message": "bad data", "param": "training_file"}
    assert events(sessions, job_id)[-1].message == "Stopped"


def test_a_running_job_cannot_finish_cancelled(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        with pytest.raises(InvalidTransition):
            ex.finish_job(s, job_id, "w1", "cancelled")
        with pytest.raises(ValueError):
            ex.finish_job(s, job_id, "w1", "queued")
        with pytest.raises(ex.LeaseLost):
            ex.finish_job(s, job_id, "w2", "succeeded")
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.finished_at) == ("running", "w1", None)


@pytest.mark.parametrize("status", ["cancelled", "succeeded", "failed"])
def test_a_cancelling_job_finishes_any_way(sessions, owner, status):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        repo.cancel_job(s, owner, job_id)
    with session_scope(sessions) as s:
        ex.finish_job(s, job_id, "w1", status, message=f"ended {status}")
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner) == (status, None) and job.finished_at is not None
    assert events(sessions, job_id)[-1].message == f"ended {status}"


# Checkpoints and models


def test_record_checkpoint_upserts_on_step(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        assert ex.latest_checkpoint(s, job_id) is None
        first = ex.record_checkpoint(s, job_id, 100, 2.5, None, "/ckpt/100", 10)
        ex.record_checkpoint(s, job_id, 50, 3.0, 3.1, "/ckpt/50", 10)
        first_id = first.id
    with session_scope(sessions) as s:
        again = ex.record_checkpoint(s, job_id, 100, 2.4, 2.6, "/ckpt/100b", 20)
        assert (again.id, again.train_loss, again.val_loss, again.storage_path, again.bytes) == (
            first_id, 2.4, 2.6, "/ckpt/100b", 20)
    with session_scope(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.job_id == job_id)) == 2
        latest = ex.latest_checkpoint(s, job_id)
        assert (latest.step, latest.storage_path) == (100, "/ckpt/100b")
        assert [c.step for c in repo.list_checkpoints(s, owner, job_id)] == [50, 100]


def test_register_job_model_twice_returns_the_same_model(sessions, owner):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        model = ex.register_job_model(s, job, "my-gpt2", "/models/m", {"n_layer": 2}, 1234)
        assert model.id == "model-" + job_id.removeprefix("job-") == ex.model_id_for_job(job_id)
        assert (model.owner, model.source, model.job_id, model.name) == (owner, "job", job_id, "my-gpt2")
    with session_scope(sessions) as s:
        again = ex.register_job_model(s, s.get(Job, job_id), "other-name", "/models/other", {}, 1)
        assert (again.id, again.storage_path, again.name) == (model.id, "/models/m", "my-gpt2")
        again_by_id = ex.register_job_model(s, job_id, "x", "/x", {}, 1)
        assert again_by_id.id == model.id
    with session_scope(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Model).where(Model.job_id == job_id)) == 1
        assert repo.get_model(s, owner, model.id).parameter_count == 1234


def test_register_job_model_recovers_from_a_concurrent_insert(sessions, owner, monkeypatch):
    job_id = running_job(sessions, owner)
    with session_scope(sessions) as s:
        winner = ex.register_job_model(s, s.get(Job, job_id), "m", "/m", {}, 1)
    calls = []
    with session_scope(sessions) as s:
        real_get = s.get

        def miss_the_first_look_up(model, ident, **kwargs):
            calls.append(ident)
            if model is Model and len(calls) == 1:
                return None
            return real_get(model, ident, **kwargs)

        monkeypatch.setattr(s, "get", miss_the_first_look_up)
        job = real_get(Job, job_id)
        assert ex.register_job_model(s, job, "m", "/m", {}, 1).id == winner.id
        repo.add_event(s, job_id, "the transaction is still usable")


# Shards


def results_for(shard: GenerationShard, fail: set[int] = frozenset()) -> list[dict]:
    return [
        {"index": i, "custom_id": f"c{i}", "prompt": f"p{i}",
         "completions": [] if i in fail else [{"text": f"t{i}", "finish_reason": "length"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 0 if i in fail else 4},
         "error": {"code": "bad_prompt", "message": "empty", "param": None} if i in fail else None}
        for i in range(shard.start, shard.stop)
    ]


def shard_rows(sessions, job_id: str) -> list[GenerationShard]:
    with session_scope(sessions) as s:
        return list(s.scalars(select(GenerationShard).where(GenerationShard.job_id == job_id)
                              .order_by(GenerationShard.index)))


def claim_shard(sessions, job_id: str, worker: str, now: datetime) -> GenerationShard | None:
    with session_scope(sessions) as s:
        return sh.claim_shard(s, job_id, worker, LEASE, now=now)


def test_plan_shards_is_idempotent(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        assert sh.plan_shards(s, job_id, 10, 4) == 3
    with session_scope(sessions) as s:
        assert sh.plan_shards(s, job_id, 10, 4) == 3
        assert sh.plan_shards(s, job_id, 99, 1) == 3  # unchanged, whatever the arguments
        assert sh.shards_remaining(s, job_id) == 3
    shards = shard_rows(sessions, job_id)
    assert [(sh.index, sh.start, sh.stop, sh.status, sh.attempts, sh.lease_owner) for sh in shards] == [
        (0, 0, 4, "pending", 0, None), (1, 4, 8, "pending", 0, None), (2, 8, 10, "pending", 0, None)]
    assert load(sessions, job_id).progress == {"total": 10, "completed": 0, "failed": 0}


def test_plan_zero_inputs_makes_no_shards(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        assert sh.plan_shards(s, job_id, 0, 4) == 0
        assert sh.shards_remaining(s, job_id) == 0
        assert sh.claim_shard(s, job_id, "w1", LEASE, now=T0) is None
        with pytest.raises(ValueError):
            sh.plan_shards(s, job_id, 10, 0)
    assert load(sessions, job_id).progress == {"total": 0, "completed": 0, "failed": 0}


def test_shard_claims_cover_every_shard_once(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 25, 5)
    claimed = []
    while (shard := claim_shard(sessions, job_id, f"w{len(claimed) % 2}", at(1))) is not None:
        claimed.append(shard)
    assert [sh.index for sh in claimed] == [0, 1, 2, 3, 4]
    assert all(sh.status == "running" and sh.attempts == 1 and sh.lease_expires_at == at(1 + LEASE)
               for sh in claimed)
    assert [sh.lease_owner for sh in claimed] == ["w0", "w1", "w0", "w1", "w0"]


def test_shards_are_not_claimed_unless_the_job_is_running(sessions, owner):
    queued = new_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, queued, 4, 2)
        assert sh.claim_shard(s, queued, "w1", LEASE, now=T0) is None
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 4, 2)
        repo.cancel_job(s, owner, job_id)
    assert claim_shard(sessions, job_id, "w1", at(1)) is None
    assert claim_shard(sessions, "job-doesnotexist", "w1", at(1)) is None


def test_an_expired_shard_is_claimed_again(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 4, 2)
    first = claim_shard(sessions, job_id, "w1", at(1))
    assert claim_shard(sessions, job_id, "w2", at(2)).index == 1
    assert claim_shard(sessions, job_id, "w3", at(3)) is None  # both leased
    with session_scope(sessions) as s:
        assert sh.renew_shard(s, job_id, 1, "w2", LEASE, now=at(LEASE)) == "running"
    again = claim_shard(sessions, job_id, "w3", at(LEASE + 2))
    assert (again.index, again.lease_owner, again.attempts) == (first.index, "w3", 2)
    taken_over = events(sessions, job_id)[-1]
    assert taken_over.message == "Shard 0 taken over by worker w3 after the lease of worker w1 expired"
    with session_scope(sessions) as s:
        with pytest.raises(ex.LeaseLost) as raised:
            sh.renew_shard(s, job_id, 0, "w1", LEASE, now=at(LEASE + 3))
        assert (raised.value.index, raised.value.holder) == (0, "w3")
        with pytest.raises(ex.LeaseLost):
            sh.renew_shard(s, job_id, 7, "w1", LEASE, now=at(LEASE + 3))
        repo.cancel_job(s, owner, job_id)
    with session_scope(sessions) as s:
        assert sh.renew_shard(s, job_id, 0, "w3", LEASE, now=at(LEASE + 4)) == "cancelling"


def test_complete_shard_upserts_results_and_counts_progress(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 5, 3)
    first = claim_shard(sessions, job_id, "w1", at(1))
    second = claim_shard(sessions, job_id, "w2", at(1))
    with session_scope(sessions) as s:
        assert sh.complete_shard(s, job_id, 0, "w1", results_for(first, fail={1})) is False
    assert load(sessions, job_id).progress == {"total": 5, "completed": 2, "failed": 1}
    with session_scope(sessions) as s:  # a redelivered shard: same rows, no duplicates
        assert sh.complete_shard(s, job_id, 0, "w1", results_for(first, fail={1})) is False
        assert sh.shards_remaining(s, job_id) == 1
    assert load(sessions, job_id).progress == {"total": 5, "completed": 2, "failed": 1}
    with session_scope(sessions) as s:
        assert sh.complete_shard(s, job_id, 1, "w2", results_for(second)) is True
        assert sh.shards_remaining(s, job_id) == 0
        assert sh.claim_shard(s, job_id, "w3", LEASE, now=at(2)) is None
    assert load(sessions, job_id).progress == {"total": 5, "completed": 4, "failed": 1}
    with session_scope(sessions) as s:
        rows = list(s.scalars(select(GenerationResult).where(GenerationResult.job_id == job_id)
                              .order_by(GenerationResult.index)))
        assert [r.index for r in rows] == [0, 1, 2, 3, 4]
        assert rows[1].error["code"] == "bad_prompt" and rows[0].error is None
        assert rows[4].completions[0]["text"] == "t4" and rows[4].custom_id == "c4"
        page, _ = repo.list_generation_results(s, owner, job_id, limit=10)
        assert len(page) == 5
    assert [sh.status for sh in shard_rows(sessions, job_id)] == ["done", "done"]
    assert any(e.message == "Shard 0 completed again by worker w1 (already done by w1)" and e.level == "warning"
               for e in events(sessions, job_id))


def test_complete_shard_after_a_takeover_is_recorded(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 2, 2)
    shard = claim_shard(sessions, job_id, "w1", at(1))
    assert claim_shard(sessions, job_id, "w2", at(LEASE + 2)).index == 0
    with session_scope(sessions) as s:  # the slow first worker finishes anyway
        assert sh.complete_shard(s, job_id, 0, "w1", results_for(shard)) is True
    last = events(sessions, job_id)[-1]
    assert last.level == "warning" and last.message == "Shard 0 completed by worker w1 after its lease passed to w2"
    with session_scope(sessions) as s:  # the second worker's results overwrite the identical rows
        assert sh.complete_shard(s, job_id, 0, "w2", results_for(shard)) is True
        with pytest.raises(ex.LeaseLost):
            sh.renew_shard(s, job_id, 0, "w2", LEASE, now=at(LEASE + 3))  # done: nothing to renew
        with pytest.raises(ValueError):
            sh.complete_shard(s, job_id, 0, "w2", [{"index": 2, "prompt": "outside the shard"}])
        with pytest.raises(ex.LeaseLost):
            sh.complete_shard(s, job_id, 5, "w2", [])
    assert load(sessions, job_id).progress == {"total": 2, "completed": 2, "failed": 0}


def test_release_shard_returns_it_to_pending(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 4, 2)
    claim_shard(sessions, job_id, "w1", at(1))
    with session_scope(sessions) as s:
        assert not sh.release_shard(s, job_id, 0, "w2")  # not its shard
        assert sh.release_shard(s, job_id, 0, "w1")
        assert not sh.release_shard(s, job_id, 0, "w1")
        assert sh.shards_remaining(s, job_id) == 2
    shard = shard_rows(sessions, job_id)[0]
    assert (shard.status, shard.lease_owner, shard.lease_expires_at, shard.attempts) == ("pending", None, None, 1)
    again = claim_shard(sessions, job_id, "w2", at(2))
    assert (again.index, again.attempts) == (0, 2)
    with session_scope(sessions) as s:  # a worker shutting down: its attempt does not count
        assert sh.release_shard(s, job_id, 0, "w2", count_attempt=False)
    assert shard_rows(sessions, job_id)[0].attempts == 1


def test_concurrent_shard_claims_never_overlap(sessions, owner):
    """Four workers, each with its own sessions, claim until nothing is left (SKIP LOCKED on PostgreSQL)."""
    workers = 4
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 400, 10)
    barrier = threading.Barrier(workers)
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(workers)}
    errors: list[BaseException] = []

    def work(worker: str) -> None:
        try:
            barrier.wait()
            while True:
                with session_scope(sessions) as s:
                    shard = sh.claim_shard(s, job_id, worker, LEASE, now=at(1))
                    if shard is None:
                        return
                    claimed[worker].append(shard.index)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    everything = sorted(i for indexes in claimed.values() for i in indexes)
    assert everything == list(range(40))
    owners = {sh.index: sh.lease_owner for sh in shard_rows(sessions, job_id)}
    assert all(owners[i] == w for w, indexes in claimed.items() for i in indexes)
    assert all(sh.attempts == 1 for sh in shard_rows(sessions, job_id))


def test_concurrent_workers_complete_every_shard_without_deadlock(sessions, owner):
    """Four workers claim and complete shards at once while the coordinator renews the job's lease: results
    referencing the job and locks on the job never wait on each other in a cycle (PostgreSQL would abort one)."""
    job_id = running_job(sessions, owner, "coordinator", type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 160, 4)
    barrier = threading.Barrier(5)
    errors: list[BaseException] = []
    done = threading.Event()

    def work(worker: str) -> None:
        try:
            barrier.wait()
            while True:
                with session_scope(sessions) as s:
                    shard = sh.claim_shard(s, job_id, worker, LEASE, now=at(1))
                    span = None if shard is None else (shard.index, shard.start, shard.stop)
                if span is None:
                    return
                index, start, stop = span
                results = [{"index": i, "custom_id": None, "prompt": "p", "completions": [], "usage": {},
                            "error": None} for i in range(start, stop)]
                with session_scope(sessions) as s:
                    sh.complete_shard(s, job_id, index, worker, results)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def renew() -> None:
        barrier.wait()
        while not done.is_set():
            with session_scope(sessions) as s:
                ex.renew_lease(s, job_id, "coordinator", LEASE, now=at(1))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    renewer = threading.Thread(target=renew)
    for thread in [*threads, renewer]:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    done.set()
    renewer.join(timeout=60)
    assert not errors, errors[0]
    assert load(sessions, job_id).progress == {"total": 160, "completed": 160, "failed": 0}
    with session_scope(sessions) as s:
        assert sh.shards_remaining(s, job_id) == 0


def test_concurrent_deliveries_of_one_job_claim_it_once(sessions, owner):
    job_id = new_job(sessions, owner)
    barrier = threading.Barrier(4)
    results: list[str | None] = []

    def deliver(worker: str) -> None:
        barrier.wait()
        with session_scope(sessions) as s:
            job = ex.claim_job(s, job_id, worker, LEASE, now=T0)
            results.append(None if job is None else worker)

    threads = [threading.Thread(target=deliver, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [r for r in results if r is not None]
    assert len(results) == 4 and len(winners) == 1
    job = load(sessions, job_id)
    assert (job.lease_owner, job.attempts) == (winners[0], 1)


def test_jobs_package_stays_free_of_worker_and_web_dependencies():
    import subprocess
    import sys

    code = ("import sys, jobs.execution, jobs.repository, jobs.models; "
            "print(','.join(m for m in ('torch', 'flask', 'celery') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_progress_counts_results_written_through_the_orm_too(sessions, owner):
    """The ORM stores error=None as JSON null, not SQL NULL; such a result still counts as completed."""
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 4, 2)
        s.add(GenerationResult(job_id=job_id, index=0, prompt="p", completions=[], usage={}, error=None))
    shard = claim_shard(sessions, job_id, "w1", at(1))
    assert shard.index == 0
    with session_scope(sessions) as s:
        sh.complete_shard(s, job_id, 0, "w1", results_for(shard, fail={1})[1:])
    assert load(sessions, job_id).progress == {"total": 4, "completed": 1, "failed": 1}


def test_deleting_a_job_deletes_its_shards(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 4, 2)
    with session_scope(sessions) as s:
        s.delete(s.get(Job, job_id))
    assert shard_rows(sessions, job_id) == []
    with session_scope(sessions) as s:
        with pytest.raises(ex.LeaseLost):
            sh.renew_shard(s, job_id, 0, "w1", LEASE, now=at(1))
        with pytest.raises(ex.LeaseLost):
            sh.complete_shard(s, job_id, 0, "w1", [])
        assert sh.shards_remaining(s, job_id) == 0


# finish_generation: any worker taking part ends a generate job


def planned_job(sessions, owner: str, total: int = 4, size: int = 2) -> str:
    job_id = running_job(sessions, owner, "coordinator", type="generate")
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, total, size)
    return job_id


def test_finish_generation_succeeds_once_every_shard_is_done(sessions, owner):
    job_id = planned_job(sessions, owner)
    first = claim_shard(sessions, job_id, "helper", at(1))
    with session_scope(sessions) as s:
        sh.complete_shard(s, job_id, first.index, "helper", results_for(first, fail={0}))
        assert sh.finish_generation(s, job_id) is None  # shard 1 is not done
    second = claim_shard(sessions, job_id, "helper", at(2))
    with session_scope(sessions) as s:
        assert sh.complete_shard(s, job_id, second.index, "helper", results_for(second)) is True
    with session_scope(sessions) as s:
        job = sh.finish_generation(s, job_id)
        assert (job.status, job.result, job.error) == ("succeeded", {"total": 4, "completed": 3, "failed": 1}, None)
    with session_scope(sessions) as s:
        assert sh.finish_generation(s, job_id) is None  # a second worker arriving late
        assert sh.finish_generation(s, "job-doesnotexist") is None
    job = load(sessions, job_id)
    assert (job.status, job.lease_owner, job.progress) == ("succeeded", None,
                                                           {"total": 4, "completed": 3, "failed": 1})
    assert events(sessions, job_id)[-1].message == "Job succeeded"
    with session_scope(sessions) as s:  # the coordinator's lease went with the job
        with pytest.raises(ex.LeaseLost):
            ex.renew_lease(s, job_id, "coordinator", LEASE, now=at(3))


def test_finish_generation_waits_for_the_plan(sessions, owner):
    job_id = running_job(sessions, owner, type="generate")
    with session_scope(sessions) as s:
        assert sh.finish_generation(s, job_id) is None  # no shards yet: not "all done"
    assert load(sessions, job_id).status == "running"
    with session_scope(sessions) as s:
        sh.plan_shards(s, job_id, 0, 2)
    with session_scope(sessions) as s:
        job = sh.finish_generation(s, job_id)
        assert (job.status, job.result) == ("succeeded", {"total": 0, "completed": 0, "failed": 0})
    queued = new_job(sessions, owner, type="generate")
    train = running_job(sessions, owner)
    with session_scope(sessions) as s:
        assert sh.finish_generation(s, queued) is None
        with pytest.raises(ValueError):
            sh.finish_generation(s, train)


def test_finish_generation_cancels_and_frees_the_shards(sessions, owner):
    job_id = planned_job(sessions, owner, total=6)
    done = claim_shard(sessions, job_id, "helper1", at(1))
    claim_shard(sessions, job_id, "helper2", at(1))
    with session_scope(sessions) as s:
        sh.complete_shard(s, job_id, done.index, "helper1", results_for(done))
        repo.cancel_job(s, owner, job_id)
    with session_scope(sessions) as s:
        assert sh.renew_shard(s, job_id, 1, "helper2", LEASE, now=at(2)) == "cancelling"
        job = sh.finish_generation(s, job_id)
        assert (job.status, job.result) == ("cancelled", {"total": 6, "completed": 2, "failed": 0})
    assert [sh.status for sh in shard_rows(sessions, job_id)] == ["done", "pending", "pending"]
    with session_scope(sessions) as s:
        with pytest.raises(ex.LeaseLost):
            sh.renew_shard(s, job_id, 1, "helper2", LEASE, now=at(3))
        assert sh.claim_shard(s, job_id, "helper3", LEASE, now=at(3)) is None


def test_finish_generation_with_an_error_fails_the_job(sessions, owner):
    job_id = planned_job(sessions, owner)
    claim_shard(sessions, job_id, "helper", at(1))
    error = {"code": "model_not_found", "message": "The weights are missing.", "param": "model"}
    with session_scope(sessions) as s:
        job = sh.finish_generation(s, job_id, error=error)
        assert (job.status, job.error, job.result) == ("failed", error, None)
    last = events(sessions, job_id)[-1]
    assert (last.level, last.data) == ("error", error)
    assert shard_rows(sessions, job_id)[0].lease_owner is None
    with session_scope(sessions) as s:
        assert sh.finish_generation(s, job_id, error=error) is None


def test_finish_job_of_a_generate_job_frees_its_shards(sessions, owner):
    job_id = planned_job(sessions, owner)
    claim_shard(sessions, job_id, "helper", at(1))
    with session_scope(sessions) as s:
        ex.finish_job(s, job_id, "coordinator", "failed", error={"code": "x", "message": "y", "param": None})
    with session_scope(sessions) as s:
        with pytest.raises(ex.LeaseLost):
            sh.renew_shard(s, job_id, 0, "helper", LEASE, now=at(2))
