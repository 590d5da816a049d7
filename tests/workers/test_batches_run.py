"""A batch end to end through the real worker code, in-process, on SQLite and PostgreSQL: the unmodified `openai`
SDK uploads the requests and creates the batch against the API, workers.generation runs its job with a tiny random
model (the same shards, per-item seeds and per-item errors as any generate job) and writes the batch's files, and
the SDK reads them back in OpenAI's batch output format."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from sqlalchemy import select

from api import create_app
from gpt2core import GPT2, GPT2Config
from jobs import batch_output, repository
from jobs.db import session_scope
from jobs.models import GenerationResult, Job
from jobs.settings import Settings
from workers.generation import item_seed, run_generation

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}


@pytest.fixture
def sdk(rt, tmp_path, database_url, owner):
    """An `openai` client of `owner` against the API served over HTTP, on the worker's database and artifacts."""
    from openai import OpenAI
    from werkzeug.serving import make_server

    app = create_app(Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path), "DATABASE_URL": database_url}))
    with session_scope(rt.sessions) as session:
        _, secret = repository.create_api_key(session, owner)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key=secret, max_retries=0)
    server.shutdown()
    thread.join()
    app.extensions["gpt2jobs"].engine.dispose()


def test_a_batch_runs_through_the_worker_and_the_sdk_reads_its_output(rt, sdk, owner, tmp_path):
    torch.manual_seed(0)
    GPT2(GPT2Config(**TINY)).save_pretrained(tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    with session_scope(rt.sessions) as session:
        model = repository.create_model(session, owner, "tiny", "import", str(tmp_path / "tiny"), config, 1).id
    requests = [
        ("hello", {"prompt": "Hello", "max_tokens": 4, "n": 2, "seed": 11, "temperature": 0.8}),
        ("too-long", {"prompt": "x " * 40, "max_tokens": 4}),  # 40 tokens: over the 32-token context
        ("greedy", {"prompt": "The", "max_tokens": 3, "temperature": 0, "stop": "\n", "echo": False}),
        ("default", {"prompt": "\x00 nul and ünïcode", "user": "someone"}),  # max_tokens: OpenAI's 16
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                                        "body": {"model": model, **body}}) + "\n" for custom_id, body in requests))
    with path.open("rb") as stream:
        input_file = sdk.files.create(file=stream, purpose="batch")
    batch = sdk.batches.create(input_file_id=input_file.id, endpoint="/v1/completions", completion_window="24h")
    assert batch.status == "validating" and batch.request_counts.total == 4
    job_id = batch.model_extra["job_id"]

    run_generation(rt, job_id)  # the worker's task body: claims, shards, generates, ends the job, finalizes

    done = sdk.batches.retrieve(batch.id)
    assert done.status == "completed", done
    assert done.request_counts.model_dump() == {"total": 4, "completed": 3, "failed": 1}
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.failed_at is None
    output = [json.loads(line) for line in sdk.files.content(done.output_file_id).read().decode().splitlines()]
    errors = [json.loads(line) for line in sdk.files.content(done.error_file_id).read().decode().splitlines()]
    assert [line["custom_id"] for line in output] == ["hello", "greedy", "default"]
    assert [line["custom_id"] for line in errors] == ["too-long"]

    with session_scope(rt.sessions) as session:
        job = session.get(Job, job_id)
        results = {r.custom_id: r for r in session.scalars(select(GenerationResult)
                                                            .where(GenerationResult.job_id == job_id))}
    assert job.status == "succeeded"
    by_id = {line["custom_id"]: line for line in output}
    for custom_id, line in by_id.items():
        result, body = results[custom_id], line["response"]["body"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert body["object"] == "text_completion" and body["model"] == model
        assert [c["text"] for c in body["choices"]] == [c["text"] for c in result.completions]
        assert [c["finish_reason"] for c in body["choices"]] == [c["finish_reason"] for c in result.completions]
        assert body["usage"] == {k: result.usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert len(by_id["hello"]["response"]["body"]["choices"]) == 2
    assert all(c["tokens"] <= 4 for c in results["hello"].completions)
    assert results["default"].prompt == "\x00 nul and ünïcode" and results["default"].completions[0]["tokens"] <= 16
    # The per-item seeds of any generate job: the line's own seed, else one derived from the job's and the index.
    assert results["hello"].usage["seed"] == 11
    assert results["greedy"].usage["seed"] == item_seed(job.params["sampling"]["seed"], 2)

    error = errors[0]["response"]
    assert error["status_code"] == 400 and errors[0]["error"] is None
    assert error["body"]["error"]["code"] == "prompt_too_long" and error["body"]["error"]["type"] == "invalid_request_error"
    usage = done.usage
    assert (usage.input_tokens, usage.output_tokens) == (
        sum(results[c].usage["prompt_tokens"] for c in by_id), sum(results[c].usage["completion_tokens"] for c in by_id))
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    run_generation(rt, job_id)  # a redelivery changes nothing, and writes no second set of files
    assert sdk.batches.retrieve(batch.id).output_file_id == done.output_file_id
    assert {f.id for f in sdk.files.list(purpose="batch_output")} == {done.output_file_id, done.error_file_id}


def test_the_sweeper_expires_overdue_batches_and_finalizes_those_a_lost_worker_left(isolated_rt, owner, tmp_path):
    """A batch whose window passed while queued is expired and finalized in one pass; a cancelled batch whose
    worker died before it stopped is cancelled by the jobs' recovery and finalized in the same pass."""
    import io
    from datetime import datetime, timedelta, timezone

    from jobs import batches, execution, uploads
    from jobs.batches import BatchCreate
    from jobs.models import Batch
    from workers.sweeper import sweep

    rt = isolated_rt
    with session_scope(rt.sessions) as session:
        model = repository.create_model(session, owner, "tiny", "import", str(tmp_path), {}, 1).id
    content = json.dumps({"custom_id": "only", "method": "POST", "url": "/v1/completions",
                          "body": {"model": model, "prompt": "Hi"}}).encode()
    file = uploads.upload_file(rt.sessions, rt.artifacts, owner, "batch", "in.jsonl", io.BytesIO(content), 1 << 20)
    request = BatchCreate(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    overdue, _ = batches.create_batch(rt.sessions, owner, request, max_inline_prompts=10,
                                      now=datetime.now(timezone.utc) - timedelta(hours=25))
    cancelled, job = batches.create_batch(rt.sessions, owner, request, max_inline_prompts=10)
    long_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    with session_scope(rt.sessions) as session:
        execution.claim_job(session, job.id, "dead:1", 30, now=long_ago)  # its worker died long ago
        batches.cancel_batch(session, owner, cancelled.id)

    done = sweep(rt)
    assert done.batches.expired == [overdue.id] and sorted(done.batches.finalized) == sorted([overdue.id, cancelled.id])
    with session_scope(rt.sessions) as session:
        shown = {b.id: batches.batch_object(session, b) for b in session.scalars(select(Batch))}
    assert shown[overdue.id]["status"] == "expired" and shown[cancelled.id]["status"] == "cancelled"
    assert shown[cancelled.id]["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
    assert sweep(rt).batches == batch_output.BatchSweep()  # nothing left to do


def test_a_generate_job_reads_a_batch_file_with_the_batch_reader(rt, owner, tmp_path):
    """A generate job given a batch file through /v1/jobs reads it by its purpose, with the batch reader: its
    requests must name the job's model, else the job fails with invalid_file (nothing runs on another model)."""
    import io

    from jobs import uploads
    from jobs.submission import submit_job
    from jobs.specs import GenerateSpec

    with session_scope(rt.sessions) as session:
        model = repository.create_model(session, owner, "tiny", "import", str(tmp_path / "none"), {}, 1).id
        other = repository.create_model(session, owner, "other", "import", str(tmp_path / "none"), {}, 1).id
    content = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                          "body": {"model": other, "prompt": "Hi"}}).encode()
    file = uploads.upload_file(rt.sessions, rt.artifacts, owner, "batch", "in.jsonl", io.BytesIO(content), 1 << 20)
    with session_scope(rt.sessions) as session:
        job_id = submit_job(session, owner, GenerateSpec(type="generate", model=model, input_file=file.id),
                            max_inline_prompts=10)[0].id
    run_generation(rt, job_id)
    with session_scope(rt.sessions) as session:
        failed = session.get(Job, job_id)
    assert failed.status == "failed" and failed.error["code"] == "invalid_file" and failed.error["param"] == "input_file"
    assert f"in.jsonl: line 1: body.model is {other!r}, but the job runs model {model!r}" == failed.error["message"]
