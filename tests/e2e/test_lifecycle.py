"""The fine-tuning lifecycle through the platform (real gunicorn and celery processes on the embedded default):
pause and resume exactly, any checkpoint as a model, early stopping and the best model, the divergence guard,
LoRA fine-tuning, "auto" hyperparameters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from .conftest import module_stack
from .test_jobs_run import FINISHED, TINY_MODEL, every, finished, submit, train_body, upload, wait_for

TEXTS = list(topics.values())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with module_stack(tmp_path_factory, "lifecycle", {"GENERATION_SHARD_SIZE": "10"}) as platform:
        yield platform


@pytest.fixture(scope="module")
def api(stack):
    return stack.client("lifecycle")


@pytest.fixture(scope="module")
def corpus(api, tmp_path_factory) -> str:
    return upload(api, tmp_path_factory.mktemp("corpus"))


def upload_text(api, tmp_path: Path, name: str, text: str, purpose: str = "train") -> str:
    path = tmp_path / name
    path.write_text(text)
    with path.open("rb") as handle:
        response = api.post("/v1/files", files={"file": (name, handle)}, data={"purpose": purpose})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def losses(api, job_id: str) -> dict[int, float]:
    return {point["step"]: point["train_loss"] for point in every(api, f"/v1/jobs/{job_id}/metrics")}


def test_a_paused_job_resumes_exactly_where_it_stopped(api, corpus):
    steps = 60
    body = train_body(corpus, steps, eval_every=20, checkpoint_every=40)
    paused = submit(api, body)
    wait_for(api, paused["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 15)
    assert api.post(f"/v1/jobs/{paused['id']}/pause").json()["status"] in ("pausing", "paused")
    job, _ = wait_for(api, paused["id"], lambda j: j["status"] == "paused", timeout=60)
    stopped_at = job["progress"]["step"]
    assert 15 <= stopped_at < steps and job["finished_at"] is None
    assert api.post(f"/v1/jobs/{paused['id']}/pause").json()["status"] == "paused"  # nothing changes
    assert stopped_at in [c["step"] for c in api.get(f"/v1/jobs/{paused['id']}/checkpoints").json()["data"]]
    assert api.post(f"/v1/jobs/{paused['id']}/resume").json()["status"] == "queued"
    conflict = api.post(f"/v1/jobs/{paused['id']}/resume")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"]
    resumed, _ = finished(api, paused["id"])
    twin, _ = finished(api, submit(api, body)["id"])

    by_step, twin_by_step = losses(api, paused["id"]), losses(api, twin["id"])
    assert sorted(by_step) == list(range(1, steps + 1)) == sorted(twin_by_step)
    assert all(abs(by_step[s] - twin_by_step[s]) <= 1e-6 for s in by_step), "the resumed run must repeat the twin"
    assert resumed["result"]["val_loss"] == pytest.approx(twin["result"]["val_loss"], abs=1e-6)
    messages = [e["message"] for e in every(api, f"/v1/jobs/{paused['id']}/events")]
    assert "Pause requested" in messages and f"Resumed from the checkpoint at step {stopped_at}" in messages
    assert any(m.startswith(f"Job paused at step {stopped_at}") for m in messages)
    statuses = [e["data"]["status"] for e in every(api, f"/v1/jobs/{paused['id']}/events")
                if e["data"] and "status" in e["data"]]
    assert statuses == ["pausing", "paused", "queued", "succeeded"]


def test_a_paused_generate_job_keeps_its_results_and_finishes_the_rest(api, corpus, tmp_path):
    model = finished(api, submit(api, train_body(corpus, 10))["id"])[0]["result"]["model"]
    lines = [{"custom_id": f"c{i}", "prompt": f"Item {i}:"} for i in range(60)]
    inputs = upload_text(api, tmp_path, "prompts.jsonl", "".join(json.dumps(line) + "\n" for line in lines),
                         purpose="generate")
    body = {"type": "generate", "model": model, "input_file": inputs, "sampling": {"max_new_tokens": 16, "seed": 5}}
    job = submit(api, body)
    wait_for(api, job["id"], lambda j: j["status"] == "running" and (j["progress"].get("completed") or 0) >= 10)
    api.post(f"/v1/jobs/{job['id']}/pause")
    paused, _ = wait_for(api, job["id"], lambda j: j["status"] == "paused", timeout=60)
    kept = api.get(f"/v1/jobs/{job['id']}/results.jsonl")
    assert kept.headers["Job-Status"] == "paused" and kept.headers["Results-Partial"] == "true"
    assert len(kept.text.splitlines()) == paused["progress"]["completed"] < 60
    api.post(f"/v1/jobs/{job['id']}/resume")
    done, _ = finished(api, job["id"])
    twin, _ = finished(api, submit(api, body)["id"])
    results = [json.loads(line) for line in api.get(f"/v1/jobs/{job['id']}/results.jsonl").text.splitlines()]
    twins = [json.loads(line) for line in api.get(f"/v1/jobs/{twin['id']}/results.jsonl").text.splitlines()]
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
    assert [r["completions"] for r in results] == [r["completions"] for r in twins]
    assert done["progress"] == {"total": 60, "completed": 60, "failed": 0}


def test_a_checkpoint_of_a_running_job_is_a_model_at_once(stack, api, corpus):
    job = submit(api, train_body(corpus, 100_000, eval_every=10, checkpoint_every=10))
    wait_for(api, job["id"], lambda j: j["progress"]["step"] >= 20)
    checkpoint = api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"][0]
    assert checkpoint["val_loss"] is not None and 0 <= checkpoint["val_accuracy"] <= 1
    assert checkpoint["val_perplexity"] == pytest.approx(2.718281828 ** checkpoint["val_loss"], rel=1e-6)
    made = api.post(f"/v1/jobs/{job['id']}/checkpoints/{checkpoint['id']}/model", json={"name": "early-bird"})
    assert made.status_code == 201, made.text
    model = made.json()
    assert (model["source"], model["job_id"], model["checkpoint_step"], model["name"]) == (
        "checkpoint", job["id"], checkpoint["step"], "early-bird")
    again = api.post(f"/v1/jobs/{job['id']}/checkpoints/{checkpoint['id']}/model")
    assert again.status_code == 200 and again.json()["id"] == model["id"]
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    second = stack.start_worker("w2")  # the first is busy training: generate with the checkpoint meanwhile
    try:
        generated, _ = finished(api, submit(api, {"type": "generate", "model": model["id"], "prompts": ["The"],
                                                  "sampling": {"max_new_tokens": 5}})["id"])
        assert api.get(f"/v1/jobs/{generated['id']}/results").json()["data"][0]["completions"]
    finally:
        api.post(f"/v1/jobs/{job['id']}/cancel")
        wait_for(api, job["id"], lambda j: j["status"] in FINISHED or j["status"] == "cancelling", timeout=60)
        second.stop()
    missing = api.post(f"/v1/jobs/{job['id']}/checkpoints/ckpt-{'0' * 24}/model")
    assert missing.status_code == 404


def test_early_stopping_registers_the_best_checkpoint(api, tmp_path):
    train = upload_text(api, tmp_path, "small.txt", TEXTS[0][:3000])
    val = upload_text(api, tmp_path, "other.txt", " ".join(TEXTS[50:60]))
    job = submit(api, {"type": "train", "training_file": train, "validation_file": val, "model": TINY_MODEL,
                       "seed": 3, "hyperparameters": {
                           "max_steps": 400, "batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 5,
                           "eval_every": 5, "checkpoint_every": 1000, "early_stopping_patience": 3,
                           "select_model": "best"}})
    job, _ = finished(api, job["id"])
    result = job["result"]
    evaluations = {p["step"]: p["val_loss"] for p in every(api, f"/v1/jobs/{job['id']}/metrics") if p["val_loss"]}
    best = min(evaluations, key=lambda step: (evaluations[step], -step))
    assert result["stop_reason"] == "early_stopping" and result["steps"] < 400
    assert result["model_step"] == result["best_step"] == best < result["steps"]
    assert result["best_val_loss"] == pytest.approx(evaluations[best])
    assert result["steps"] == best + 3 * 5
    checkpoints = {c["step"]: c for c in api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]}
    assert best in checkpoints and checkpoints[best]["val_loss"] == pytest.approx(evaluations[best])


def test_a_learning_rate_of_one_ends_training_diverged_with_a_registrable_checkpoint(api, corpus):
    job = submit(api, train_body(corpus, 200, learning_rate=1.0, warmup_steps=0, checkpoint_every=1, eval_every=0,
                                 keep_checkpoints=2))
    job, _ = wait_for(api, job["id"], lambda j: j["status"] in FINISHED)
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["code"] == "training_diverged" and error["param"] == "hyperparameters.learning_rate"
    assert "lower learning_rate" in error["message"] and "Training diverged at step" in error["message"]
    checkpoints = api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    last_good = checkpoints[-1]
    assert f"at step {last_good['step']}, is kept ({last_good['id']}" in error["message"]
    made = api.post(f"/v1/jobs/{job['id']}/checkpoints/{last_good['id']}/model")
    assert made.status_code == 201 and made.json()["checkpoint_step"] == last_good["step"]


def test_a_lora_fine_tune_registers_a_merged_plain_gpt2(api, corpus, stack):
    base = finished(api, submit(api, train_body(corpus, 10))["id"])[0]["result"]["model"]
    body = {**train_body(corpus, 20), "type": "finetune", "model": base,
            "method": {"type": "lora", "rank": 4, "alpha": 8}}
    body["hyperparameters"]["learning_rate"] = 1e-2
    job, _ = finished(api, submit(api, body)["id"])
    messages = " ".join(e["message"] for e in every(api, f"/v1/jobs/{job['id']}/events"))
    assert "Training 2,048 of 1,624,064 parameters" in messages  # rank 4 on every Linear layer of one block
    model = api.get(f"/v1/models/{job['result']['model']}").json()
    folder = Path(stack.environment["GPT2JOBS_VAR_DIR"]) / "artifacts" / "models" / model["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    from transformers import GPT2LMHeadModel

    from gpt2core import GPT2

    tokens = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262]])
    ours = GPT2.from_pretrained(folder).eval()(tokens)[0]
    theirs = GPT2LMHeadModel.from_pretrained(folder).eval()(tokens).logits
    assert torch.allclose(ours[..., : theirs.shape[-1]], theirs, atol=1e-4)
    generated, _ = finished(api, submit(api, {"type": "generate", "model": model["id"], "prompts": ["A"],
                                              "sampling": {"max_new_tokens": 4}})["id"])


def test_auto_hyperparameters_are_resolved_and_shown(api, corpus):
    job = submit(api, {"type": "train", "training_file": corpus, "model": TINY_MODEL, "seed": 1,
                       "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate": "auto",
                                           "eval_every": 0, "checkpoint_every": 0}})
    assert job["hyperparameters"]["batch_size"] == "auto"
    job, _ = finished(api, job["id"], timeout=600)
    hyper = job["hyperparameters"]
    assert hyper["auto"] == ["n_epochs", "batch_size", "learning_rate"]
    assert isinstance(hyper["batch_size"], int) and isinstance(hyper["grad_accum_steps"], int)
    assert hyper["n_epochs"] >= 1 and 0 < hyper["learning_rate"] <= 1e-3
    resolved = [e for e in every(api, f"/v1/jobs/{job['id']}/events") if e["message"].startswith("Resolved")]
    assert len(resolved) == 1 and resolved[0]["data"]["hyperparameters"] == hyper
    refused = api.post("/v1/jobs", json={"type": "train", "training_file": corpus,
                                         "hyperparameters": {"batch_size": "auto", "grad_accum_steps": 4}})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "hyperparameters.grad_accum_steps"
