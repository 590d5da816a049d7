"""Batches at the database level (jobs.batches), on SQLite and PostgreSQL: the status derived from the batch and
its job, finalization (the output and error files' lines, counts, usage, once), and expiry by the sweep. The
worker's side is played by the same jobs.execution and jobs.shards calls workers.generation makes."""
from __future__ import annotations

import io
import json
import threading
from datetime import datetime, timedelta, timezone

import pytest

from jobs import batch_output, batches, execution, repository, shards, uploads
from jobs.batches import BatchCreate, batch_status
from jobs.db import session_scope
from jobs.errors import Conflict
from jobs.models import Batch, File, Job
from jobs.states import CANCELLED, CANCELLING, FAILED, PAUSED, PAUSING, QUEUED, RUNNING, SUCCEEDED, transition
from jobs.storage import ArtifactStore

WORKER = "test-worker:1"


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def make_batch(sessions, store, owner, count: int = 4, window: str = "24h") -> tuple[Batch, Job]:
    with session_scope(sessions) as session:
        model = repository.create_model(session, owner, "tiny", "import", "/nowhere", {"n_positions": 128}, 1)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": model.id, "prompt": f"Prompt {i}", "max_tokens": 3, "n": 2 if i == 0 else 1}}
             for i in range(count)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = uploads.upload_file(sessions, store, owner, "batch", "requests.jsonl", io.BytesIO(content), 1 << 20)
    batch, job = batches.create_batch(sessions, owner, BatchCreate(
        input_file_id=file.id, endpoint="/v1/completions", completion_window=window), max_inline_prompts=10)
    assert job is not None and batch.job_id == job.id
    return batch, job


def ok(index: int, choices: int = 1) -> dict:
    return {"index": index, "custom_id": f"r{index}", "prompt": f"Prompt {index}",
            "completions": [{"index": c, "text": f" text {index}.{c}", "finish_reason": "length", "tokens": 3,
                             "token_ids": [1, 2, 3]} for c in range(choices)],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3 * choices, "total_tokens": 3 + 3 * choices,
                      "seed": 7}, "error": None}


def failed(index: int, code: str) -> dict:
    return {"index": index, "custom_id": f"r{index}", "prompt": f"Prompt {index}", "completions": [], "usage": {},
            "error": {"code": code, "message": f"{code} happened", "param": "prompt" if code == "prompt_too_long" else None}}


def run_shards(sessions, job_id: str, results_by_shard: list[list[dict]], shard_size: int = 2,
               finish: bool = True) -> None:
    """What workers.generation does: claim the job, plan its shards, complete them with these results."""
    with session_scope(sessions) as session:
        execution.claim_job(session, job_id, WORKER, 30)
        shards.plan_shards(session, job_id, session.get(Job, job_id).progress["total"], shard_size)
    for results in results_by_shard:
        with session_scope(sessions) as session:
            shard = shards.claim_shard(session, job_id, WORKER, 30)
            index = shard.index
        with session_scope(sessions) as session:
            shards.complete_shard(session, job_id, index, WORKER, results)
    if finish:
        with session_scope(sessions) as session:
            assert shards.finish_generation(session, job_id) is not None


def reload(sessions, batch_id: str) -> dict:
    with session_scope(sessions) as session:
        return batches.batch_object(session, session.get(Batch, batch_id))


def lines_of(sessions, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    with session_scope(sessions) as session:
        path = session.get(File, file_id).storage_path
    with open(path, "rb") as stream:
        return [json.loads(line) for line in stream.read().decode().splitlines()]


def stored_files(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in (store.root / "files").iterdir())


# Status


def row(outcome=None, cancelling=False, expired=False) -> Batch:
    now = datetime.now(timezone.utc)
    return Batch(outcome=outcome, cancelling_at=now if cancelling else None, expired_at=now if expired else None)


def job_in(status: str, started: bool = True) -> Job:
    return Job(status=status, started_at=datetime.now(timezone.utc) if started else None)


@pytest.mark.parametrize("batch, job, status", [
    (row(), job_in(QUEUED, started=False), "validating"),
    (row(), job_in(RUNNING), "in_progress"),
    (row(), job_in(QUEUED, started=True), "in_progress"),  # back in the queue after a lost worker
    (row(), job_in(PAUSING), "in_progress"),
    (row(), job_in(PAUSED), "in_progress"),
    (row(cancelling=True), job_in(RUNNING), "cancelling"),
    (row(), job_in(CANCELLING), "cancelling"),  # its job cancelled through /v1/jobs
    (row(expired=True), job_in(CANCELLING), "finalizing"),
    (row(), job_in(SUCCEEDED), "finalizing"),
    (row(cancelling=True), job_in(CANCELLED), "cancelling"),  # OpenAI's cancel path has no finalizing
    (row(cancelling=True), job_in(SUCCEEDED), "cancelling"),  # it finished first: completed once finalized
    (row(), None, "finalizing"),
    *[(row(outcome=o), job_in(s), o) for o, s in (("completed", SUCCEEDED), ("failed", FAILED),
                                                   ("expired", CANCELLED), ("cancelled", CANCELLED))],
    (row(outcome="failed"), None, "failed"),
])
def test_the_status_is_derived_from_the_batch_and_its_job(batch, job, status):
    assert batch_status(batch, job) == status


def test_a_model_with_a_short_context_takes_requests_that_fit_it(sessions, store, owner):
    with session_scope(sessions) as session:
        model = repository.create_model(session, owner, "short", "import", "/nowhere", {"n_positions": 8}, 1).id
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": model, "prompt": "Hi", **({"max_tokens": 4} if i else {})}} for i in range(3)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = uploads.upload_file(sessions, store, owner, "batch", "short.jsonl", io.BytesIO(content), 1 << 20)
    request = BatchCreate(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    refused, _ = batches.create_batch(sessions, owner, request, max_inline_prompts=10)  # line 1: 16 by default
    assert [(e["line"], e["param"]) for e in refused.errors] == [(1, "body.max_tokens")]
    file = uploads.upload_file(sessions, store, owner, "batch", "short.jsonl", io.BytesIO(content.split(b"\n", 1)[1]),
                               1 << 20)
    batch, job = batches.create_batch(sessions, owner, request.model_copy(update={"input_file_id": file.id}),
                                      max_inline_prompts=10)
    assert batch.outcome is None and job.params["sampling"]["max_new_tokens"] == 4  # the longest request's


# Finalization


def test_finalization_writes_openai_output_and_error_lines_once(sessions, store, owner):
    batch, job = make_batch(sessions, store, owner)
    run_shards(sessions, job.id, [[ok(0, choices=2), failed(1, "prompt_too_long")],
                                  [ok(2), failed(3, "generation_failed")]])
    live = reload(sessions, batch.id)  # before finalization: counts and usage read from the job and its results
    assert live["status"] == "finalizing" and live["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    assert (live["usage"]["input_tokens"], live["usage"]["output_tokens"]) == (6, 9)
    assert batch_output.finalize_batch(sessions, store, batch.id)
    shown = reload(sessions, batch.id)
    assert shown["status"] == "completed" and shown["completed_at"] is not None and shown["errors"] is None
    assert shown["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    assert shown["usage"] == {"input_tokens": 6, "output_tokens": 9, "total_tokens": 15,
                              "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}

    output = lines_of(sessions, shown["output_file_id"])
    assert [line["custom_id"] for line in output] == ["r0", "r2"]
    first = output[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    response = first["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_")
    body = response["body"]
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == batch.model
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"text": " text 0.0", "index": 0, "logprobs": None, "finish_reason": "length"},
                               {"text": " text 0.1", "index": 1, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}

    errors = lines_of(sessions, shown["error_file_id"])
    assert [(e["custom_id"], e["response"]["status_code"], e["response"]["body"]["error"]["code"],
             e["response"]["body"]["error"]["type"], e["error"]) for e in errors] == [
        ("r1", 400, "prompt_too_long", "invalid_request_error", None),
        ("r3", 500, "generation_failed", "server_error", None)]
    assert errors[0]["response"]["body"]["error"]["param"] == "prompt"

    with session_scope(sessions) as session:
        files = [session.get(File, shown[key]) for key in ("output_file_id", "error_file_id")]
    assert [(f.owner, f.purpose, f.filename, f.records) for f in files] == [
        (owner, "batch_output", f"{batch.id}_output.jsonl", 2), (owner, "batch_output", f"{batch.id}_error.jsonl", 2)]
    before = stored_files(store)
    assert not batch_output.finalize_batch(sessions, store, batch.id)  # once: nothing more is written
    assert stored_files(store) == before and reload(sessions, batch.id) == shown


def test_concurrent_finalizations_store_one_set_of_files(sessions, store, owner):
    batch, job = make_batch(sessions, store, owner)
    run_shards(sessions, job.id, [[ok(0), ok(1)], [ok(2), ok(3)]])
    barrier, outcomes = threading.Barrier(3), []

    def finalize():
        barrier.wait()
        outcomes.append(batch_output.finalize_batch(sessions, store, batch.id))

    threads = [threading.Thread(target=finalize) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [False, False, True]
    shown = reload(sessions, batch.id)
    assert shown["error_file_id"] is None  # every request completed: no error file
    assert len(lines_of(sessions, shown["output_file_id"])) == 4
    assert stored_files(store) == sorted([batch.input_file_id, shown["output_file_id"]])


def test_a_failed_job_fails_its_batch_with_the_job_s_error(sessions, store, owner):
    batch, job = make_batch(sessions, store, owner)
    run_shards(sessions, job.id, [[ok(0), ok(1)]], finish=False)
    with session_scope(sessions) as session:
        shards.finish_generation(session, job.id, error={"code": "worker_lost", "message": "lost", "param": None})
    assert batch_output.sweep_batches(sessions, store).finalized.count(batch.id) == 1
    shown = reload(sessions, batch.id)
    assert shown["status"] == "failed" and shown["failed_at"] is not None
    assert shown["errors"]["data"] == [{"code": "worker_lost", "message": "lost", "param": None, "line": None}]
    assert shown["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    errors = lines_of(sessions, shown["error_file_id"])
    assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in errors] == [
        ("r2", None, "batch_failed"), ("r3", None, "batch_failed")]
    assert "worker_lost: lost" in errors[0]["error"]["message"]


# Expiry


def expire_now(sessions, batch_id: str) -> datetime:
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    with session_scope(sessions) as session:
        session.get(Batch, batch_id).expires_at = past
    return past


def test_a_running_batch_past_its_window_stops_and_ends_expired_with_what_was_done(sessions, store, owner):
    batch, job = make_batch(sessions, store, owner, window="1h")
    assert reload(sessions, batch.id)["expires_at"] - reload(sessions, batch.id)["created_at"] == 3600
    run_shards(sessions, job.id, [[ok(0), ok(1)]], finish=False)  # shard 1 not done yet
    with session_scope(sessions) as session:
        running_shard = shards.claim_shard(session, job.id, WORKER, 30).index  # being generated
    assert batch_output.sweep_batches(sessions, store).expired.count(batch.id) == 0  # not due yet
    expire_now(sessions, batch.id)

    swept = batch_output.sweep_batches(sessions, store)
    assert batch.id in swept.expired and batch.id not in swept.finalized
    with session_scope(sessions) as session:
        assert session.get(Job, job.id).status == CANCELLING  # cooperatively: the running shard finishes
    shown = reload(sessions, batch.id)
    assert shown["status"] == "finalizing" and shown["expired_at"] is not None
    with session_scope(sessions) as session, pytest.raises(Conflict, match="has expired"):
        batches.cancel_batch(session, owner, batch.id)

    with session_scope(sessions) as session:  # the worker stores its shard and sees the job cancelling
        shards.complete_shard(session, job.id, running_shard, WORKER, [ok(2), failed(3, "prompt_too_long")])
    with session_scope(sessions) as session:
        assert shards.finish_generation(session, job.id).status == CANCELLED
    assert batch.id in batch_output.sweep_batches(sessions, store).finalized
    shown = reload(sessions, batch.id)
    assert shown["status"] == "expired" and shown["expired_at"] is not None
    assert shown["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert [line["custom_id"] for line in lines_of(sessions, shown["output_file_id"])] == ["r0", "r1", "r2"]


def test_a_queued_batch_past_its_window_expires_in_one_sweep_with_every_request_unrun(sessions, store, owner):
    batch, job = make_batch(sessions, store, owner, count=3)
    expire_now(sessions, batch.id)
    swept = batch_output.sweep_batches(sessions, store)
    assert batch.id in swept.expired and batch.id in swept.finalized
    shown = reload(sessions, batch.id)
    assert shown["status"] == "expired" and shown["output_file_id"] is None
    assert shown["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    errors = lines_of(sessions, shown["error_file_id"])
    assert [(e["custom_id"], e["response"], e["error"]) for e in errors] == [
        (f"r{i}", None, {"code": "batch_expired", "message": "This request could not be executed before the "
                         "completion window expired."}) for i in range(3)]
    with session_scope(sessions) as session:
        assert session.get(Job, job.id).status == CANCELLED


def test_a_job_that_finishes_before_it_stops_completes_its_batch(sessions, store, owner):
    batch, job = make_batch(sessions, store, owner, count=2)
    run_shards(sessions, job.id, [], finish=False)
    with session_scope(sessions) as session:
        index = shards.claim_shard(session, job.id, WORKER, 30).index
    expire_now(sessions, batch.id)
    assert batch.id in batch_output.sweep_batches(sessions, store).expired
    with session_scope(sessions) as session:
        shards.complete_shard(session, job.id, index, WORKER, [ok(0), ok(1)])
        transition(session.get(Job, job.id), SUCCEEDED)  # cancelling -> succeeded: done before it noticed
    assert batch.id in batch_output.sweep_batches(sessions, store).finalized
    shown = reload(sessions, batch.id)
    assert shown["status"] == "completed" and shown["expired_at"] is None and shown["error_file_id"] is None
