"""The official `openai` SDK, unmodified (only base_url and api_key changed), drives the platform: files, a
fine-tuning job from a prompt/completion file, models, and a batch on the fine-tuned model, on real gunicorn and
celery processes (the embedded default)."""
from __future__ import annotations

import json
import time

import openai
import pytest
from openai import OpenAI

from .conftest import module_stack
from .test_jobs_run import TINY_MODEL, finished, submit, upload

#: 64 prompt/completion examples: "Q: <a> plus <b>?" -> " <a+b>"; short enough for the tiny model's 32 tokens.
EXAMPLES = [{"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}"} for a in range(8) for b in range(8)]
POLL_SECONDS = 0.3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with module_stack(tmp_path_factory, "openai-sdk", {"GENERATION_SHARD_SIZE": "3"}) as platform:
        yield platform


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.create_key("sdk-user"), max_retries=0)


@pytest.fixture(scope="module")
def base_model(stack, client, tmp_path_factory) -> str:
    """A tiny model trained from scratch through our own API (OpenAI has no such endpoint), for the same owner."""
    api = stack.client("sdk-user")
    api.headers["Authorization"] = f"Bearer {client.api_key}"
    tmp = tmp_path_factory.mktemp("corpus")
    job = submit(api, {"type": "train", "training_file": upload(api, tmp), "model": TINY_MODEL, "seed": 3,
                       "hyperparameters": {"max_steps": 20, "batch_size": 8, "learning_rate": 3e-3}})
    done, _ = finished(api, job["id"])
    return done["result"]["model"]


def wait(retrieve, done, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = retrieve()
        if done(item):
            return item
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"still {item.status} after {timeout} s: {item}")


def test_files_round_trip(client, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    uploaded = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert (uploaded.object, uploaded.purpose, uploaded.filename, uploaded.status) == ("file", "fine-tune", "qa.jsonl",
                                                                                      "processed")
    assert uploaded.bytes == path.stat().st_size and uploaded.id.startswith("file-")
    assert client.files.retrieve(uploaded.id).created_at == uploaded.created_at
    assert uploaded.id in [f.id for f in client.files.list(purpose="fine-tune")]
    assert client.files.content(uploaded.id).read() == path.read_bytes()
    assert client.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_a_refused_file_is_a_bad_request_naming_the_line(client, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert "line 2" in refused.value.message


def test_models_list_and_retrieve(client, base_model):
    listed = {m.id: m for m in client.models.list()}
    assert base_model in listed and listed[base_model].object == "model"
    model = client.models.retrieve(base_model)
    assert model.owned_by == "sdk-user" and isinstance(model.created, int)


@pytest.fixture(scope="module")
def fine_tuned(client, base_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "qa.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    # bytes, as SDK users often upload them: the file is named "upload", and still read as JSONL
    training_file = client.files.create(file=path.read_bytes(), purpose="fine-tune")
    assert training_file.model_extra["records"] == len(EXAMPLES)
    job = client.fine_tuning.jobs.create(model=base_model, training_file=training_file.id, suffix="sdk", seed=11,
                                         hyperparameters={"n_epochs": 2, "batch_size": 8,
                                                          "learning_rate_multiplier": 2.0},
                                         metadata={"run": "e2e"})
    assert job.status == "queued" and job.model == base_model and job.training_file == training_file.id
    done = wait(lambda: client.fine_tuning.jobs.retrieve(job.id), lambda j: j.status in ("succeeded", "failed",
                                                                                         "cancelled"))
    assert done.status == "succeeded", done.error
    return done


def test_a_fine_tuning_job_runs_to_a_model(client, base_model, fine_tuned):
    assert fine_tuned.fine_tuned_model.startswith("model-") and fine_tuned.fine_tuned_model != base_model
    assert fine_tuned.hyperparameters.n_epochs == 2 and fine_tuned.hyperparameters.batch_size == 8
    assert fine_tuned.hyperparameters.learning_rate_multiplier == pytest.approx(2.0)
    assert fine_tuned.trained_tokens > 0 and fine_tuned.finished_at >= fine_tuned.created_at
    assert fine_tuned.user_provided_suffix == "sdk" and fine_tuned.seed == 11
    model = client.models.retrieve(fine_tuned.fine_tuned_model)
    assert model.model_extra["name"].endswith(":sdk") and model.model_extra["job_id"] == fine_tuned.id
    assert fine_tuned.id in [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "e2e"})]

    events = list(client.fine_tuning.jobs.list_events(fine_tuned.id, limit=5))  # auto-paginates newest first
    assert len(events) > 5 and all(e.object == "fine_tuning.job.event" for e in events)
    ids = [int(e.id.removeprefix("ftevent-")) for e in events]
    assert ids == sorted(ids, reverse=True)
    assert events[-1].message.startswith("Created finetune job")
    assert any(e.type == "metrics" for e in events)

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(fine_tuned.id))
    steps = [c.step_number for c in checkpoints]
    assert steps and steps == sorted(steps, reverse=True)  # the last step's checkpoint made the model
    assert checkpoints[0].fine_tuned_model_checkpoint == fine_tuned.fine_tuned_model
    assert checkpoints[0].metrics.train_loss is not None


def batch_line(custom_id: str, model: str, prompt: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": model, "prompt": prompt, **body}}) + "\n"


def test_a_batch_on_the_fine_tuned_model(client, fine_tuned, tmp_path):
    model = fine_tuned.fine_tuned_model
    lines = [
        batch_line("plain", model, "Q: 2 plus 3?\nA:", max_tokens=4, temperature=0),
        batch_line("two", model, "Q: 1 plus 1?\nA:", max_tokens=5, n=2, seed=5, top_p=0.9),
        batch_line("stop", model, "Q: 4 plus 4?\nA:", max_tokens=8, stop="\n", temperature=0.7, seed=1),
        batch_line("default-length", model, "Once upon a"),  # OpenAI's completions default: 16 tokens
        batch_line("too-long", model, "word " * 40, max_tokens=4),  # 41 tokens: more than the model's 32
        batch_line("unicode", model, "Zürich, 東京 and \U0001f600:", max_tokens=3, temperature=0),
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(lines))
    batch_file = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"purpose": "e2e"})
    assert batch.status in ("validating", "in_progress") and batch.input_file_id == batch_file.id
    assert batch.expires_at == batch.created_at + 24 * 3600 and batch.metadata == {"purpose": "e2e"}
    seen = set()

    def retrieve():
        current = client.batches.retrieve(batch.id)
        seen.add(current.status)
        return current

    done = wait(retrieve, lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
    assert done.status == "completed", done.errors
    assert seen <= {"validating", "in_progress", "finalizing", "completed"}
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 5, 1)
    assert done.completed_at >= done.in_progress_at >= done.created_at and done.finalizing_at is not None
    assert batch.id in [b.id for b in client.batches.list(limit=2)]

    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    by_id = {line["custom_id"]: line for line in output}
    assert set(by_id) == {"plain", "two", "stop", "default-length", "unicode"}
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200 and line["id"]
        body = line["response"]["body"]
        assert body["object"] == "text_completion" and body["model"] == model
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        assert all(c["finish_reason"] in ("stop", "length") and isinstance(c["text"], str) for c in body["choices"])
    assert [c["index"] for c in by_id["two"]["response"]["body"]["choices"]] == [0, 1]
    assert by_id["plain"]["response"]["body"]["usage"]["completion_tokens"] <= 4
    assert by_id["default-length"]["response"]["body"]["usage"]["completion_tokens"] <= 16
    assert "\n" not in by_id["stop"]["response"]["body"]["choices"][0]["text"]
    [error] = errors
    assert error["custom_id"] == "too-long" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "prompt_too_long"
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0

    # the same batch again: requests with a seed (or greedy) give the same texts; without one, OpenAI's rule,
    # each run draws its own
    again = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/completions", completion_window="24h")
    again = wait(lambda: client.batches.retrieve(again.id), lambda b: b.status == "completed")
    repeated = {json.loads(line)["custom_id"]: json.loads(line)["response"]["body"]["choices"]
                for line in client.files.content(again.output_file_id).text.splitlines()}
    repeatable = ("plain", "two", "stop", "unicode")
    assert {cid: repeated[cid] for cid in repeatable} == {cid: by_id[cid]["response"]["body"]["choices"]
                                                          for cid in repeatable}


def test_unsupported_parameters_fail_the_batch_naming_each_line(client, fine_tuned, tmp_path):
    model = fine_tuned.fine_tuned_model
    path = tmp_path / "unsupported.jsonl"
    path.write_text(batch_line("ok", model, "Hi") + batch_line("logprobs", model, "Hi", logprobs=5)
                    + batch_line("penalty", model, "Hi", frequency_penalty=0.5) + batch_line("fine", model, "Hi",
                                                                                          presence_penalty=0))
    batch = client.batches.create(input_file_id=client.files.create(file=path.open("rb"), purpose="batch").id,
                                  endpoint="/v1/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None and batch.output_file_id is None
    problems = {(e.line, e.param) for e in batch.errors.data}
    assert problems == {(2, "body.logprobs"), (3, "body.frequency_penalty")}, batch.errors


def test_a_batch_on_another_endpoint_is_refused(client, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "x", "messages": []}}) + "\n")
    with pytest.raises(openai.APIStatusError):
        client.batches.create(input_file_id=client.files.create(file=path.open("rb"), purpose="batch").id,
                              endpoint="/v1/chat/completions", completion_window="24h")
