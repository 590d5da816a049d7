"""The API as production runs it: gunicorn (docker-compose's command) on PostgreSQL, enqueueing into Redis."""
from __future__ import annotations

from jobs.queue import TASK_NAMES

from .conftest import corpus_file


def test_submitted_job_is_stored_queued_and_its_message_is_in_redis(redis_stack, queued_messages, tmp_path):
    redis_stack.migrate()
    redis_stack.start_api()
    api = redis_stack.client("alice")
    assert api.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}

    with corpus_file(tmp_path).open("rb") as text:
        upload = api.post("/v1/files", files={"file": ("corpus.txt", text)}, data={"purpose": "train"})
    assert upload.status_code == 201, upload.text
    body = {"type": "train", "training_file": upload.json()["id"],
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
            "hyperparameters": {"max_steps": 20, "batch_size": 4}}
    submitted = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "first-run"})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert submitted.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["hyperparameters"]["warmup_steps"] == 2

    retried = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "first-run"})
    assert retried.status_code == 202 and retried.json()["id"] == job["id"]
    [(headers, args)] = queued_messages("train")  # one message for the two submissions
    assert headers["task"] == TASK_NAMES["train"] and args == [job["id"]]
    assert queued_messages("generate") == []

    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert [j["id"] for j in api.get("/v1/jobs").json()["data"]] == [job["id"]]
    assert redis_stack.client("mallory").get(f"/v1/jobs/{job['id']}").status_code == 404
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
