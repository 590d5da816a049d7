"""The sweeper's recovery pass and a worker's hand-back, in-process, on a database of their own (SQLite and
PostgreSQL) and the filesystem broker: what a user sees in the job after a lost message, a lost worker, a poison
job and a worker shutting down. (The same faults with real processes and servers: tests/e2e/test_faults.py.)"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import update

from jobs import execution
from jobs.db import session_scope
from jobs.models import Checkpoint, Job
from jobs.queue import message_job_id, waiting_job_ids
from workers.generation import ShuttingDown, generate_items, run_generation
from workers.runtime import SHUTTING_DOWN, Runtime
from workers.sweeper import sweep
from workers.training import run_training

from .test_worker_runs import CORPUS, TINY, events, generate_job, job, register, train_job, upload

LONG_AGO = datetime.now(timezone.utc) - timedelta(hours=1)


def messages(rt: Runtime) -> list[str | None]:
    """Job ids of the messages waiting in the filesystem broker, one per message."""
    return sorted(message_job_id(path.read_bytes()) or "" for path in (rt.settings.broker_folder / "messages").glob("*.msg"))


def sent_long_ago(rt: Runtime, job_id: str) -> None:
    with session_scope(rt.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=LONG_AGO))


def test_a_queued_job_whose_message_was_lost_gets_exactly_one_new_message(isolated_rt, owner):
    rt = isolated_rt
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS))
    assert sweep(rt).dispatched == []  # its message was sent just now (by the API, in production)
    sent_long_ago(rt, job_id)  # ... and lost: the broker restarted empty
    assert sweep(rt).dispatched == [job_id]
    assert messages(rt) == [job_id] and waiting_job_ids(rt.celery) == {job_id}
    assert events(rt, job_id)[-1].message.startswith("Sent to the queue again: no message for it was waiting")
    # All workers are busy for an hour: the message waits, and no second one joins it.
    for _ in range(3):
        sent_long_ago(rt, job_id)
        assert sweep(rt).dispatched == []
    assert messages(rt) == [job_id]
    assert job(rt, job_id).status == "queued" and job(rt, job_id).lease_owner is None
    run_training(rt, job_id)
    assert job(rt, job_id).status == "succeeded"


def test_a_lost_worker_s_job_waits_as_queued_gets_one_message_and_resumes(isolated_rt, owner):
    rt = isolated_rt
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS))
    with session_scope(rt.sessions) as session:
        execution.claim_job(session, job_id, "dead:1", 30, now=LONG_AGO)
    done = sweep(rt)
    assert (done.requeued, done.dispatched) == ([job_id], [job_id])
    waiting = job(rt, job_id)
    assert (waiting.status, waiting.lease_owner, waiting.workers_lost) == ("queued", None, 1)
    assert [e.message for e in events(rt, job_id)][-2:] == [
        "Attempt 1 ended without a word from worker dead:1: it stopped renewing its lease (killed, out of memory, "
        "or its machine stopped)", "Sent to the queue for another worker"]
    assert sweep(rt).dispatched == [] and messages(rt) == [job_id]
    run_training(rt, job_id)
    resumed = job(rt, job_id)
    assert (resumed.status, resumed.attempts, resumed.workers_lost) == ("succeeded", 2, 1)


def test_a_job_that_loses_every_worker_fails_after_job_max_attempts(isolated_rt, owner):
    rt = isolated_rt  # JOB_MAX_ATTEMPTS=2
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS))
    for worker in ("oom:1", "oom:2"):
        with session_scope(rt.sessions) as session:
            assert execution.claim_job(session, job_id, worker, 30, now=LONG_AGO) is not None
        sweep(rt)
    failed = job(rt, job_id)
    assert (failed.status, failed.error["code"], failed.workers_lost) == ("failed", "worker_lost", 2)
    attempts = [e.data for e in events(rt, job_id) if e.message.startswith("Attempt ")]
    assert [(a["attempt"], a["worker"]) for a in attempts] == [(1, "oom:1"), (2, "oom:2")]
    assert messages(rt) == [job_id]  # the one message sent after the first loss, none after the failure


def test_a_shutting_down_worker_checkpoints_and_hands_its_training_job_back(isolated_rt, owner):
    rt = isolated_rt
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS), max_steps=100, eval_every=0, checkpoint_every=0,
                       sample_every=0)
    runner = threading.Thread(target=run_training, args=(rt, job_id))
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while (job(rt, job_id).progress or {}).get("step", 0) < 1:  # the first progress write
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.02)
        SHUTTING_DOWN.set()
        runner.join(60)
    finally:
        SHUTTING_DOWN.clear()
    handed = job(rt, job_id)
    assert (handed.status, handed.lease_owner, handed.workers_lost) == ("queued", None, 0)
    message = [e.message for e in events(rt, job_id) if "stopped:" in e.message][-1]
    step = int(message.split("a checkpoint was saved at step ")[1].split(")")[0])
    assert 1 <= step < 100 and messages(rt) == [job_id]
    with session_scope(rt.sessions) as session:
        assert session.query(Checkpoint).filter_by(job_id=job_id, step=step).one()
    run_training(rt, job_id)
    done = job(rt, job_id)
    assert (done.status, done.attempts, done.progress["step"]) == ("succeeded", 2, 100)
    assert f"Resumed from the checkpoint at step {step}" in [e.message for e in events(rt, job_id)]


def test_a_shutting_down_generation_worker_hands_the_job_back_and_it_completes(isolated_rt, owner, tmp_path):
    import torch

    from gpt2core import GPT2, GPT2Config

    rt = isolated_rt
    torch.manual_seed(0)
    GPT2(GPT2Config(**TINY)).save_pretrained(tmp_path / "tiny")
    job_id = generate_job(rt, owner, register(rt, owner, tmp_path / "tiny"), [f"prompt {i}" for i in range(40)])
    SHUTTING_DOWN.set()
    try:
        run_generation(rt, job_id)
    finally:
        SHUTTING_DOWN.clear()
    assert job(rt, job_id).status == "queued" and messages(rt) == [job_id]
    run_generation(rt, job_id)
    done = job(rt, job_id)
    assert done.status == "succeeded" and done.progress == {"total": 40, "completed": 40, "failed": 0}


def test_generation_stops_between_batches_when_asked(tiny_model):
    from jobs.specs import Sampling
    from workers.generation import BATCH_PROMPTS, Item

    sampling = Sampling(max_new_tokens=2, seed=1)
    items = [Item(i, None, f"p{i}", sampling) for i in range(BATCH_PROMPTS + 1)]
    answers = iter([False, True])
    try:
        generate_items(tiny_model, "job-x", items, lambda: next(answers))
    except ShuttingDown:
        pass
    else:
        raise AssertionError("generate_items went on after should_stop() said stop")
    assert len(generate_items(tiny_model, "job-x", items)) == BATCH_PROMPTS + 1
