"""gpt2jobs_client against real processes: gunicorn and a celery worker on the embedded default (SQLite and the
filesystem broker), started once for the module (tests/client/conftest.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from demo.local import free_port
from gpt2jobs_client import (APIConnectionError, APIError, Checkpoint, Client, ConflictError, Event, File, GenerationResult,
                             Job, Model, NotFoundError, UnprocessableEntityError)
from tests.e2e.conftest import Stack, corpus_file

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}


def cancel(client: Client, job_id: str) -> None:
    """Cancel a job the test does not need run (one that already finished is a 409, and that is fine)."""
    try:
        client.jobs.cancel(job_id)
    except ConflictError:
        pass


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    assert stack.api_url is not None
    with Client(stack.api_url, stack.create_key(f"client-{uuid.uuid4().hex[:8]}"), backoff_factor=0.05) as client:
        yield client


def test_train_wait_model_round_trip_and_generate(client: Client, tmp_path: Path):
    training = client.files.upload(corpus_file(tmp_path), "train")
    assert isinstance(training, File) and training.purpose == "train" and training.raw["object"] == "file"
    assert client.files.get(training.id) == training
    assert client.files.content(training.id) == (tmp_path / "corpus.txt").read_bytes()

    job = client.jobs.create(type="train", training_file=training.id, model=TINY_MODEL, seed=7,
                             hyperparameters={"max_steps": 10, "batch_size": 4, "eval_every": 5, "checkpoint_every": 5})
    assert isinstance(job, Job) and job.status == "queued" and job.hyperparameters["max_steps"] == 10
    snapshots: list[Job] = []
    done = client.jobs.wait(job.id, on_progress=snapshots.append, poll_interval=0.2, timeout=120)
    assert done.status == "succeeded", done.error
    assert snapshots[-1] == done and len(snapshots) >= 2
    assert all(a.raw != b.raw for a, b in zip(snapshots, snapshots[1:])), "called only when the job changed"
    steps = [s.progress["step"] for s in snapshots]
    assert steps == sorted(steps) and steps[-1] == 10

    # Pagination: more jobs than one page holds, listed lazily, newest first.
    more = [client.jobs.create(type="train", training_file=training.id, model=TINY_MODEL,
                               hyperparameters={"max_steps": 1, "batch_size": 1}) for _ in range(2)]
    for extra in more:
        cancel(client, extra.id)
    listed = list(client.jobs.list(page_size=1))
    assert [j.id for j in listed] == [more[1].id, more[0].id, job.id]
    succeeded = list(client.jobs.list(type="train", status="succeeded", page_size=1))
    assert job.id in [j.id for j in succeeded] and {j.status for j in succeeded} == {"succeeded"}

    events = list(client.jobs.events(job.id))
    assert events and all(isinstance(e, Event) for e in events)
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert any(e.type == "metrics" for e in events)
    assert [e.id for e in client.jobs.events(job.id, follow=True, poll_interval=0.1)] == [e.id for e in events]
    checkpoints = client.jobs.checkpoints(job.id)
    assert all(isinstance(c, Checkpoint) for c in checkpoints) and [c.step for c in checkpoints] == [5, 10]
    for c in checkpoints:  # evaluation steps (eval_every 5, on the held-out share of the training file)
        assert c.val_loss is not None and c.val_perplexity == pytest.approx(math.exp(c.val_loss))
        assert c.val_accuracy is not None and 0 <= c.val_accuracy <= 1
        assert (c.val_perplexity, c.val_accuracy) == (c.raw["val_perplexity"], c.raw["val_accuracy"])

    model = client.models.get(done.output_model)
    assert isinstance(model, Model) and model.source == "job" and model.job_id == job.id and model.checkpoint_step is None
    archive = client.models.download(model.id, tmp_path)
    assert archive == tmp_path / f"{model.id}.tar.gz"
    with tarfile.open(archive) as tar:
        assert f"{model.id}/config.json" in tar.getnames()
    copy = client.models.upload(archive, name="round-trip")
    assert copy.source == "import" and copy.name == "round-trip" and copy.parameter_count == model.parameter_count
    assert [m.id for m in client.models.list(page_size=1)] == [copy.id, model.id]
    assert client.models.delete(copy.id).deleted
    with pytest.raises(NotFoundError):
        client.models.get(copy.id)

    prompts = ["Hello", "The", "Once upon a time", "Python is"]
    generated = client.jobs.create(type="generate", model=model.id, prompts=prompts, sampling={"max_new_tokens": 6})
    assert generated.raw["prompt_count"] == 4
    followed = list(client.jobs.events(generated.id, follow=True, poll_interval=0.2))  # until it has finished
    assert client.jobs.get(generated.id).status == "succeeded"
    assert [e.id for e in followed] == [e.id for e in client.jobs.events(generated.id)]
    assert client.jobs.wait(generated.id, timeout=5).status == "succeeded"
    results = list(client.jobs.results(generated.id))
    assert all(isinstance(r, GenerationResult) for r in results)
    assert [r.index for r in results] == [0, 1, 2, 3] and [r.prompt for r in results] == prompts
    assert all(r.error is None and r.texts for r in results)

    assert [f.id for f in client.files.list()] == [training.id]
    assert client.files.delete(training.id).deleted and list(client.files.list()) == []


def test_api_errors_are_raised_with_status_code_message_and_param(client: Client, tmp_path: Path):
    with pytest.raises(NotFoundError) as missing:
        client.jobs.get("job-nope")
    assert (missing.value.status, missing.value.code) == (404, "not_found") and isinstance(missing.value, APIError)
    assert "job-nope" in missing.value.message and str(missing.value).startswith("404 not_found: ")

    with pytest.raises(UnprocessableEntityError) as invalid:
        client.jobs.create(type="train", training_file="file-x", hyperparameters={"batch_size": 0})
    error = invalid.value
    assert (error.status, error.code, error.param) == (422, "invalid_request", "hyperparameters.batch_size")
    assert "(param: hyperparameters.batch_size)" in str(error)

    with pytest.raises(APIError) as refused:
        client.files.upload(corpus_file(tmp_path), "nonsense")
    assert (refused.value.status, refused.value.param) == (400, "purpose")

    assert client.base_url is not None
    with Client(client.base_url, "sk-wrong", max_retries=0) as stranger, pytest.raises(APIError) as unknown:
        list(stranger.jobs.list())
    assert (unknown.value.status, unknown.value.code) == (401, "invalid_api_key")


def test_connection_errors_are_retried_then_raised():
    started = time.monotonic()
    with Client(f"http://127.0.0.1:{free_port()}", "sk-x", max_retries=2, backoff_factor=0.05) as client:
        with pytest.raises(APIConnectionError) as failed:
            client.jobs.get("job-x")
    assert failed.value.attempts == 3 and time.monotonic() - started < 10


class Flaky(httpx.BaseTransport):
    """Forwards to the real API, but loses the first answer to each POST /v1/jobs (the job was stored) and
    answers the first GET with a 503."""

    def __init__(self):
        self.real = httpx.HTTPTransport()
        self.keys: list[str | None] = []
        self.failed: set[str] = set()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and "GET" not in self.failed:
            self.failed.add("GET")
            return httpx.Response(503, json={"error": {"code": "database_unavailable", "message": "later",
                                                       "param": None}}, headers={"Retry-After": "0"})
        response = self.real.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/jobs":
            self.keys.append(request.headers.get("Idempotency-Key"))
            if "POST" not in self.failed:
                self.failed.add("POST")
                response.read()
                response.close()
                raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


def test_a_create_retried_after_a_lost_answer_submits_one_job(client: Client, stack: Stack, tmp_path: Path):
    file_id = client.files.upload(corpus_file(tmp_path), "train").id
    body = {"type": "train", "training_file": file_id, "model": TINY_MODEL, "hyperparameters": {"max_steps": 1}}
    flaky = Flaky()
    key = client._transport.http.headers["Authorization"].split()[-1]
    with Client(stack.api_url, key, backoff_factor=0.01, transport=flaky) as unreliable:
        assert [j.id for j in unreliable.jobs.list()] == []  # after one 503
        job = unreliable.jobs.create(body)
    assert len(flaky.keys) == 2 and flaky.keys[0] == flaky.keys[1] and flaky.keys[0] is not None
    assert [j.id for j in client.jobs.list()] == [job.id]
    cancel(client, job.id)

    # The same explicit key twice: the original job, not a second one.
    first = client.jobs.create(body, idempotency_key="nightly-1")
    assert client.jobs.create(body, idempotency_key="nightly-1").id == first.id
    assert len(list(client.jobs.list())) == 2
    cancel(client, first.id)


def test_importing_the_client_does_not_import_torch_or_the_server():
    code = ("import sys, gpt2jobs_client; "
            "print(sorted(m for m in ('torch', 'flask', 'sqlalchemy', 'celery', 'jobs', 'api') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def started(client: Client, job_id: str, timeout: float = 120) -> Job:
    """The job once a worker has taken it."""
    deadline = time.monotonic() + timeout
    while (job := client.jobs.get(job_id)).status == "queued":
        assert time.monotonic() < deadline, f"{job_id} never started"
        time.sleep(0.2)
    assert job.status == "running", (job.status, job.error)
    return job


def test_pause_resume_wait_and_register_a_checkpoint_as_a_model(client: Client, tmp_path: Path):
    file_id = client.files.upload(corpus_file(tmp_path), "train").id
    # The stack's one worker (concurrency 1) trains this one, so the next job stays queued.
    busy = client.jobs.create(type="train", training_file=file_id, model=TINY_MODEL,
                              hyperparameters={"max_steps": 100_000, "batch_size": 1, "eval_every": 0})
    queued = None
    try:
        started(client, busy.id)
        queued = client.jobs.create(type="train", training_file=file_id, model=TINY_MODEL,
                                    hyperparameters={"max_steps": 3, "batch_size": 1, "eval_every": 0})

        # A queued job is paused at once; pausing again changes nothing.
        paused = client.jobs.pause(queued.id)
        assert isinstance(paused, Job) and paused.id == queued.id and paused.status == "paused"
        assert paused.is_paused and paused.is_settled and not paused.is_terminal
        assert client.jobs.pause(queued.id).status == "paused"
        assert [j.id for j in client.jobs.list(status="paused")] == [queued.id]

        # Followers return at a pause (a paused job does not go on by itself), unless told to wait through it.
        assert client.jobs.wait(queued.id).status == "paused"
        assert client.jobs.wait(queued.id, timeout=10, poll_interval=0.1).status == "paused"
        followed = list(client.jobs.stream(queued.id, poll_interval=0.1))
        assert isinstance(followed[-1], Job) and followed[-1].status == "paused"
        assert any(isinstance(e, Event) and "paused" in e.message for e in followed)
        assert [e.id for e in client.jobs.events(queued.id, follow=True)] == [e.id for e in client.jobs.events(queued.id)]
        with pytest.raises(TimeoutError):
            client.jobs.wait(queued.id, timeout=0.5, poll_interval=0.1, stop_on_pause=False)

        # Only a paused job can be resumed: 409, raised as ConflictError.
        with pytest.raises(ConflictError) as refused:
            client.jobs.resume(busy.id)
        assert (refused.value.status, refused.value.code) == (409, "conflict") and busy.id in refused.value.message
        # On other devices only when its global batch (1 window) splits across them: 422, naming devices.
        with pytest.raises(UnprocessableEntityError) as uneven:
            client.jobs.resume(queued.id, devices=2)
        assert uneven.value.param == "devices" and client.jobs.get(queued.id).status == "paused"
        resumed = client.jobs.resume(queued.id, devices=1)
        assert resumed.status == "queued" and not resumed.is_settled and resumed.devices == 1
        with pytest.raises(ConflictError):
            client.jobs.resume(queued.id)

        # A running job is pausing until its worker has written a checkpoint, then paused.
        assert client.jobs.pause(busy.id).status in ("pausing", "paused")
        stopped = client.jobs.wait(busy.id)
        assert stopped.status == "paused" and stopped.is_settled, stopped.error
        checkpoints = client.jobs.checkpoints(busy.id)
        assert checkpoints and all(isinstance(c, Checkpoint) for c in checkpoints)
        last = checkpoints[-1]
        assert last.step >= 1 and last.val_loss is None and last.val_perplexity is None and last.val_accuracy is None
        assert any(f"paused at step {last.step}" in e.message for e in client.jobs.events(busy.id))

        # Any checkpoint can become a model, whatever the job's status; registering it again gives the same one.
        model = client.jobs.register_checkpoint(busy.id, last.id, name="paused-run")
        assert isinstance(model, Model) and (model.source, model.job_id, model.name) == ("checkpoint", busy.id, "paused-run")
        assert model.checkpoint_step == last.step == model.raw["checkpoint_step"]
        assert client.jobs.register_checkpoint(busy.id, last.id) == model
        assert client.models.get(model.id) == model
        with pytest.raises(NotFoundError):
            client.jobs.register_checkpoint(busy.id, "ckpt-0123456789abcdef01234567")

        # The worker is free: the resumed job runs to its end, and the registered model generates.
        assert client.jobs.wait(queued.id, timeout=120, poll_interval=0.2).status == "succeeded"
        generate = client.jobs.create(type="generate", model=model.id, prompts=["Hi"], sampling={"max_new_tokens": 2})
        assert client.jobs.wait(generate.id, timeout=120, poll_interval=0.2).status == "succeeded"

        # A paused job is cancelled at once; a cancelled one cannot be paused.
        assert client.jobs.cancel(busy.id).status == "cancelled"
        with pytest.raises(ConflictError):
            client.jobs.pause(busy.id)
    finally:
        for job in (busy, queued):
            if job is not None:
                cancel(client, job.id)
