"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API over our finetune jobs (the same rows as /v1/jobs)."""
import json

import pytest

from jobs import repository
from jobs.auto import auto_learning_rate
from jobs.models import Job
from tests.api.test_jobs import assert_error

PROMPT_COMPLETION = b'{"prompt": "Q: 2+2?\\nA:", "completion": " 4"}\n' * 400


def create(helper, headers, body):
    return helper.client.post("/v1/fine_tuning/jobs", data=json.dumps(body), content_type="application/json",
                              headers=headers)


@pytest.fixture
def refs(helper, auth) -> dict[str, str]:
    return {"train": helper.upload_file(auth, PROMPT_COMPLETION, "train.jsonl")["id"],
            "model": helper.create_model(auth)}


def fine_tune(helper, auth, refs, **fields) -> dict:
    response = create(helper, auth, {"model": refs["model"], "training_file": refs["train"], **fields})
    assert response.status_code == 200, response.json
    return response.json


def test_a_fine_tuning_job_is_a_finetune_job(helper, auth, refs):
    job = fine_tune(helper, auth, refs, suffix="qa", seed=7, metadata={"team": "search"})
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("job-") and job["status"] == "queued"
    assert job["model"] == refs["model"] and job["training_file"] == refs["train"] and job["validation_file"] is None
    assert job["hyperparameters"] == {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["fine_tuned_model"] is None and job["error"] is None and job["finished_at"] is None
    assert (job["seed"], job["user_provided_suffix"], job["metadata"]) == (7, "qa", {"team": "search"})
    assert job["organization_id"] == helper.owner_of(auth) and isinstance(job["created_at"], int)
    ours = helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json
    assert ours["type"] == "finetune" and ours["method"] == {"type": "full"} and ours["seed"] == 7
    assert {k: ours["hyperparameters"][k] for k in ("n_epochs", "batch_size", "learning_rate")} == {
        "n_epochs": "auto", "batch_size": "auto", "learning_rate": "auto"}
    assert [m["queue"] for m in helper.broker_messages()] == ["train"]


def test_numbers_mean_what_they_mean_at_openai(helper, auth, refs):
    job = fine_tune(helper, auth, refs, hyperparameters={"n_epochs": 2, "batch_size": 4,
                                                         "learning_rate_multiplier": 0.5})
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    hyper = helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json["hyperparameters"]
    # the model has 1,000 parameters: a multiplier of 1 is the pretraining rate for its size (jobs.auto)
    assert hyper["learning_rate"] == pytest.approx(0.5 * auto_learning_rate(1000, "train"))
    assert (hyper["n_epochs"], hyper["batch_size"], hyper["grad_accum_steps"], hyper["max_steps"]) == (2, 4, 1, None)


def test_resolved_values_are_shown_once_the_worker_chose_them(helper, auth, refs):
    job = fine_tune(helper, auth, refs)
    with helper.session() as session:  # as jobs.auto stores them: a micro-batch of 2 accumulated 4 times
        row = session.get(Job, job["id"])
        row.params = {**row.params, "hyperparameters": {**row.params["hyperparameters"], "n_epochs": 3.0,
                                                        "batch_size": 2, "grad_accum_steps": 4,
                                                        "learning_rate": auto_learning_rate(1000, "full")}}
    shown = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json["hyperparameters"]
    assert shown == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 0.1}


def test_method_supervised_carries_the_hyperparameters(helper, auth, refs):
    job = fine_tune(helper, auth, refs, method={"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 1}}})
    assert job["hyperparameters"]["n_epochs"] == 1


@pytest.mark.parametrize("fields, param", [
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "3"}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
    ({"suffix": "x" * 65}, "suffix"),  # OpenAI's limit: 64
    ({"suffix": "no spaces"}, "suffix"),
    ({"model": "gpt2"}, "model"),
    ({"hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 2}}}}, "hyperparameters"),
    ({"unknown": 1}, "unknown"),
])
def test_what_cannot_run_is_refused_naming_the_field(helper, auth, refs, fields, param):
    response = create(helper, auth, {"model": refs["model"], "training_file": refs["train"], **fields})
    assert_error(response, 422, "invalid_request", param)
    assert helper.broker_messages() == []


@pytest.mark.parametrize("fields, param", [({"model": "model-doesnotexist"}, "model"),
                                           ({"training_file": "file-doesnotexist"}, "training_file")])
def test_a_reference_to_nothing_is_400_as_for_jobs(helper, auth, refs, fields, param):
    response = create(helper, auth, {"model": refs["model"], "training_file": refs["train"], **fields})
    assert_error(response, 400, "invalid_input", param)


def test_another_owners_model_and_file_are_unknown(helper, auth, other_auth, refs):
    assert_error(create(helper, other_auth, {"model": refs["model"], "training_file": refs["train"]}), 400,
                 "invalid_input", "model")
    own_model = helper.create_model(other_auth)
    assert_error(create(helper, other_auth, {"model": own_model, "training_file": refs["train"]}), 400,
                 "invalid_input", "training_file")


def test_list_is_newest_first_filters_metadata_and_holds_only_finetune_jobs(helper, auth, other_auth, refs):
    first = fine_tune(helper, auth, refs, metadata={"team": "a"})
    helper.train_job(auth)
    second = fine_tune(helper, auth, refs, metadata={"team": "b"})
    third = fine_tune(helper, auth, refs, metadata={"team": "a", "x": "y"})
    listed = helper.client.get("/v1/fine_tuning/jobs", headers=auth).json
    assert [j["id"] for j in listed["data"]] == [third["id"], second["id"], first["id"]]
    page = helper.client.get(f"/v1/fine_tuning/jobs?limit=1&after={third['id']}", headers=auth).json
    assert [j["id"] for j in page["data"]] == [second["id"]] and page["has_more"] is True
    team_a = helper.client.get("/v1/fine_tuning/jobs?metadata[team]=a", headers=auth).json
    assert [j["id"] for j in team_a["data"]] == [third["id"], first["id"]]
    limited = helper.client.get("/v1/fine_tuning/jobs?metadata[team]=a&limit=1", headers=auth).json
    assert [j["id"] for j in limited["data"]] == [third["id"]] and limited["has_more"] is True
    assert helper.client.get("/v1/fine_tuning/jobs", headers=other_auth).json["data"] == []
    assert_error(helper.client.get(f"/v1/fine_tuning/jobs/{first['id']}", headers=other_auth), 404, "not_found", None)


def test_a_train_job_is_not_a_fine_tuning_job(helper, auth):
    job = helper.train_job(auth)
    assert_error(helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth), 404, "not_found",
                 "fine_tuning_job_id")


def test_cancel_pause_and_resume(helper, auth, refs):
    job = fine_tune(helper, auth, refs)
    paused = helper.client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=auth).json
    assert paused["status"] == "paused"
    assert helper.client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=auth).json["status"] == "queued"
    helper.set_status(job["id"], "running")
    assert helper.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth).json["status"] == "cancelling"
    helper.set_status(job["id"], "cancelled")
    assert_error(helper.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth), 409, "conflict", None)


def test_a_succeeded_job_names_its_model(helper, auth, refs):
    job = fine_tune(helper, auth, refs)
    helper.set_status(job["id"], "running", "succeeded")
    with helper.session() as session:
        row = session.get(Job, job["id"])
        row.result = {"model": "model-abc", "model_step": 20, "steps": 20}
        row.progress = {**row.progress, "tokens": 12345}
    shown = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json
    assert (shown["status"], shown["fine_tuned_model"], shown["trained_tokens"]) == ("succeeded", "model-abc", 12345)
    assert isinstance(shown["finished_at"], int)


def test_a_failed_job_carries_its_error(helper, auth, refs):
    job = fine_tune(helper, auth, refs)
    helper.set_status(job["id"], "running", "failed")
    with helper.session() as session:
        session.get(Job, job["id"]).error = {"code": "training_diverged", "message": "Training diverged", "param": None}
    shown = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json
    assert shown["status"] == "failed" and shown["error"]["code"] == "training_diverged"


def test_events_are_newest_first_in_openai_shape(helper, auth, refs):
    job = fine_tune(helper, auth, refs)
    added = helper.add_events(job["id"], ["one", "two", "three"])
    events = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json["data"]
    assert [e["message"] for e in events] == ["three", "two", "one", f"Created finetune job {job['id']}"]
    assert events[0]["id"] == f"ftevent-{added[-1]}" and events[0]["object"] == "fine_tuning.job.event"
    assert events[0]["level"] == "info" and events[0]["type"] == "message" and events[0]["data"] == {}
    page = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=2&after={events[1]['id']}",
                             headers=auth).json
    assert [e["message"] for e in page["data"]] == ["one", f"Created finetune job {job['id']}"]
    assert page["has_more"] is False
    assert_error(helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?after=evt-1", headers=auth), 400,
                 "invalid_request", "after")


def test_a_warning_event_is_warn(helper, auth, refs):
    job = fine_tune(helper, auth, refs, hyperparameters={"n_epochs": 1})
    with helper.session() as session:
        repository.add_event(session, job["id"], "careful", level="warning")
    events = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json["data"]
    assert events[0]["level"] == "warn"


def test_checkpoints_are_newest_first_with_their_models(helper, auth, refs):
    job = fine_tune(helper, auth, refs)
    ids = helper.add_checkpoints(job["id"], [10, 20, 30])
    listed = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=auth).json
    assert [c["step_number"] for c in listed["data"]] == [30, 20, 10]
    first = listed["data"][0]
    assert first["object"] == "fine_tuning.job.checkpoint" and first["fine_tuning_job_id"] == job["id"]
    assert first["fine_tuned_model_checkpoint"] is None and first["metrics"]["train_loss"] == pytest.approx(10 / 30)
    page = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints?limit=1&after={ids[2]}",
                             headers=auth).json
    assert [c["step_number"] for c in page["data"]] == [20] and page["has_more"] is True
    # a registered checkpoint's model, and the job's own model at its step
    helper.set_status(job["id"], "running", "succeeded")
    with helper.session() as session:
        session.get(Job, job["id"]).result = {"model": "model-final", "model_step": 30}
    with helper.session() as session:  # as POST /v1/jobs/{id}/checkpoints/{ckpt}/model registers one
        model = repository.create_model(session, helper.owner_of(auth), "tiny@step-10", "checkpoint", "/nowhere",
                                        {"model_type": "gpt2"}, 1000, job_id=job["id"])
        model.checkpoint_step = 10
        registered = model.id
    listed = helper.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=auth).json["data"]
    assert [c["fine_tuned_model_checkpoint"] for c in listed] == ["model-final", None, registered]


def test_a_fine_tune_file_is_jsonl_whatever_its_name(helper, auth):
    # the openai SDK names bytes it uploads "upload": the purpose, not the name, says the format
    as_fine_tune = helper.upload_file(auth, PROMPT_COMPLETION, "upload", "fine-tune")
    assert (as_fine_tune["records"], as_fine_tune["status"]) == (400, "processed")
    as_train = helper.upload_file(auth, PROMPT_COMPLETION, "upload", "train")
    assert as_train["records"] == 1 and as_train["tokens"] > as_fine_tune["tokens"]  # one text: the JSON itself
    refused = helper.upload(auth, b"plain text, not JSON\n", "notes.txt", "fine-tune")
    assert refused.status_code == 400 and refused.json["error"]["code"] == "invalid_file"
    assert "line 1" in refused.json["error"]["message"]
