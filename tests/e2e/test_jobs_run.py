"""Jobs from REST to results on real processes: gunicorn and celery workers started with docker-compose's
commands, on PostgreSQL and Redis (and once on the embedded default)."""
from __future__ import annotations

import json
import time
from typing import Any

from .conftest import Api, Stack, corpus_file

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}
FINISHED = ("succeeded", "failed", "cancelled")


def wait_for(api: Api, job_id: str, done, timeout: float = 180) -> tuple[dict, list[dict]]:
    """Poll the job until done(job) holds; returns the job and every snapshot seen on the way."""
    snapshots = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        snapshots.append(job)
        if done(job):
            return job, snapshots
        assert job["status"] not in FINISHED, f"job ended {job['status']}: {job['error']}"
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {snapshots[-1]['status']} after {timeout} s: {snapshots[-1]}")


def finished(api: Api, job_id: str, timeout: float = 180) -> tuple[dict, list[dict]]:
    job, snapshots = wait_for(api, job_id, lambda j: j["status"] in FINISHED, timeout)
    assert job["status"] == "succeeded", f"{job['status']}: {job['error']}"
    return job, snapshots


def every(api: Api, path: str) -> list[dict[str, Any]]:
    """All items of a paged list, following after/has_more."""
    items, params = [], {"limit": 100}
    while True:
        page = api.get(path, params=params).json()
        items += page["data"]
        if not page["has_more"]:
            return items
        params["after"] = page["last_id"]


def upload(api: Api, tmp_path, purpose: str = "train", **kwargs) -> str:
    path = corpus_file(tmp_path, **kwargs)
    with path.open("rb") as text:
        response = api.post("/v1/files", files={"file": (path.name, text)}, data={"purpose": purpose})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(api: Api, body: dict) -> dict:
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def train_body(file_id: str, steps: int, **hyper: Any) -> dict:
    return {"type": "train", "training_file": file_id, "model": TINY_MODEL, "seed": 7,
            "hyperparameters": {"max_steps": steps, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 10,
                                "checkpoint_every": 10, **hyper}}


def started_on(workers, job_id: str) -> list:
    return [w for w in workers if f"job {job_id}: " in w.output()]


def check_training_run(api: Api, job: dict, snapshots: list[dict], steps: int) -> None:
    statuses = [s["status"] for s in snapshots]
    assert statuses[0] == "queued" or statuses[0] == "running"
    assert statuses[-1] == "succeeded" and "running" in statuses
    progress_steps = [s["progress"]["step"] for s in snapshots]
    assert progress_steps == sorted(progress_steps) and progress_steps[-1] == steps
    assert job["progress"]["total_steps"] == steps and job["progress"]["loss"] is not None
    assert job["result"]["model"].startswith("model-") and job["attempts"] == 1
    events = every(api, f"/v1/jobs/{job['id']}/events")
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert any(e["type"] == "metrics" and "val_loss" in e["data"] for e in events)
    checkpoints = api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == list(range(10, steps + 1, 10))
    assert all(c["bytes"] > 0 for c in checkpoints)


def test_train_finetune_and_generate_across_two_workers(redis_stack: Stack, tmp_path):
    redis_stack.migrate()
    redis_stack.start_api()
    workers = [redis_stack.start_worker("w1"), redis_stack.start_worker("w2")]
    assert "device cpu" in workers[0].output() and "consuming queues: generate, train" in workers[0].output()
    api = redis_stack.client("alice")

    file_id = upload(api, tmp_path)
    job, snapshots = finished(api, submit(api, train_body(file_id, 30))["id"])
    check_training_run(api, job, snapshots, 30)
    model = api.get(f"/v1/models/{job['result']['model']}").json()
    assert model["source"] == "job" and model["job_id"] == job["id"] and model["config"]["n_layer"] == 1
    assert model["config"]["model_type"] == "gpt2"  # Hugging Face's config, as for imported models

    tuned, _ = finished(api, submit(api, {**train_body(file_id, 10), "type": "finetune", "model": model["id"],
                                          "suffix": "again"})["id"])
    tuned_model = api.get(f"/v1/models/{tuned['result']['model']}").json()
    assert tuned_model["name"].endswith(":again") and tuned_model["id"] != model["id"]

    lines = [{"custom_id": f"item-{i}", "prompt": f"Prompt number {i} is about"} for i in range(200)]
    lines[57]["prompt"] = "word " * 40  # longer than the model's context: an error line, the rest go on
    inputs = tmp_path / "prompts.jsonl"
    inputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with inputs.open("rb") as handle:
        input_file = api.post("/v1/files", files={"file": ("prompts.jsonl", handle)},
                              data={"purpose": "generate"}).json()["id"]
    job, _ = finished(api, submit(api, {"type": "generate", "model": tuned_model["id"], "input_file": input_file,
                                        "sampling": {"max_new_tokens": 12, "seed": 3}})["id"])
    assert job["progress"] == {"total": 200, "completed": 199, "failed": 1}
    results = [json.loads(line) for line in api.get(f"/v1/jobs/{job['id']}/results.jsonl").text.splitlines()]
    assert [r["index"] for r in results] == list(range(200))
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
    assert results[57]["error"]["code"] == "prompt_too_long" and results[57]["completions"] == []
    assert all(r["error"] is None and r["completions"][0]["tokens"] > 0 for r in results if r["index"] != 57)
    assert all("shard" in w.output() for w in workers), "both workers should have generated shards"


def test_cancel_a_running_training_job_and_the_worker_goes_on(redis_stack: Stack, tmp_path):
    redis_stack.migrate()
    redis_stack.start_api()
    redis_stack.start_worker("w1")
    api = redis_stack.client("bob")
    file_id = upload(api, tmp_path)

    long_job = submit(api, train_body(file_id, 100_000))
    wait_for(api, long_job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] > 20)
    assert api.post(f"/v1/jobs/{long_job['id']}/cancel").json()["status"] == "cancelling"
    next_job = submit(api, train_body(file_id, 10))
    job, _ = wait_for(api, long_job["id"], lambda j: j["status"] in FINISHED, timeout=30)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 100_000
    assert api.get(f"/v1/jobs/{long_job['id']}/checkpoints").json()["data"], "checkpoints are kept"
    finished(api, next_job["id"])


def test_a_killed_worker_s_job_is_resumed_by_another_from_its_last_checkpoint(redis_stack: Stack, tmp_path):
    redis_stack.migrate()
    redis_stack.start_api()
    workers = [redis_stack.start_worker("w1"), redis_stack.start_worker("w2")]
    api = redis_stack.client("carol")
    file_id = upload(api, tmp_path)

    # keep_checkpoints 16: every checkpoint stays, so the list shows each was recorded once across the takeover
    job = submit(api, train_body(file_id, 240, eval_every=50, checkpoint_every=25, keep_checkpoints=16))
    wait_for(api, job["id"], lambda j: j["progress"]["step"] > 60)
    [doomed] = started_on(workers, job["id"])
    doomed.kill()
    job, _ = finished(api, job["id"], timeout=240)
    [survivor] = [w for w in workers if w is not doomed]
    assert started_on([survivor], job["id"]) == [survivor]
    assert job["attempts"] == 2 and job["progress"]["step"] == 240
    messages = [e["message"] for e in every(api, f"/v1/jobs/{job['id']}/events")]
    resumed = [m for m in messages if m.startswith("Resumed from the checkpoint at step")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[-1]) >= 50
    steps = [c["step"] for c in api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]]
    assert steps == [*range(25, 240, 25), 240]  # every 25 steps, and the run's last


def test_embedded_default_trains_and_generates(embedded_stack: Stack, tmp_path):
    embedded_stack.migrate()
    embedded_stack.start_api()
    embedded_stack.start_worker("w1")
    api = embedded_stack.client("dave")
    job, snapshots = finished(api, submit(api, train_body(upload(api, tmp_path), 30))["id"])
    check_training_run(api, job, snapshots, 30)
    generated, _ = finished(api, submit(api, {"type": "generate", "model": job["result"]["model"],
                                              "prompts": ["Hello", "The", ""],
                                              "sampling": {"max_new_tokens": 8}})["id"])
    results = api.get(f"/v1/jobs/{generated['id']}/results").json()["data"]
    assert [r["index"] for r in results] == [0, 1, 2] and all(r["completions"] for r in results)
