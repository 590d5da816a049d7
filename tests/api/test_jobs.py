"""/v1/jobs: submit (validated, stored, then enqueued), idempotency, list, cancel, events, checkpoints, results."""
import importlib
import json

import pytest

from tests.api.conftest import ApiHelper

DEFAULT_HYPERPARAMETERS = {
    "max_steps": 1000, "n_epochs": None, "batch_size": 8, "grad_accum_steps": 1, "learning_rate": 6e-4,
    "warmup_steps": 100, "weight_decay": 0.1, "eval_every": 100, "checkpoint_every": 500, "sample_every": 0,
    "keep_checkpoints": 3, "early_stopping_patience": 0, "select_model": "last", "divergence_threshold": 2.0,
    "divergence_patience": 5, "auto": [],
}
DEFAULT_SAMPLING = {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
                    "stop": [], "n": 1}


def assert_error(response, status: int, code: str, param):
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code and response.json["error"]["param"] == param, response.json
    return response.json["error"]["message"]


def job_ids(helper, headers, query: str = "") -> list[str]:
    response = helper.client.get(f"/v1/jobs{query}", headers=headers)
    assert response.status_code == 200, response.json
    return [job["id"] for job in response.json["data"]]


@pytest.fixture
def refs(helper, auth) -> dict[str, str]:
    """Ids a job body can name: a training file, a generation input file and a registered model."""
    return {"train": helper.upload_file(auth)["id"], "generate": helper.generation_file(auth)["id"],
            "model": helper.create_model(auth)}


def fill(body, refs):
    """`body` with "{train}", "{generate}" and "{model}" replaced by real ids."""
    return json.loads(json.dumps(body).replace("{train}", refs["train"]).replace("{generate}", refs["generate"])
                      .replace("{model}", refs["model"]))


# Submitting


def test_train_job_resolves_every_default(helper, auth, refs):
    response = helper.submit(auth, {"type": "train", "training_file": refs["train"]})
    assert response.status_code == 202, response.json
    job = response.json
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("job-") and job["object"] == "job" and job["type"] == "train"
    assert job["status"] == "queued" and job["training_file"] == refs["train"]
    assert job["validation_file"] is None and job["input_file"] is None
    assert job["model"] == "gpt2" and job["hyperparameters"] == DEFAULT_HYPERPARAMETERS
    assert isinstance(job["seed"], int) and 0 <= job["seed"] < 2**63
    assert job["suffix"] is None and job["metadata"] == {} and job["attempts"] == 0
    assert isinstance(job["created_at"], int) and job["started_at"] is None and job["finished_at"] is None
    assert job["progress"]["step"] == 0 and job["progress"]["total_steps"] == 1000
    assert job["result"] is None and job["error"] is None
    assert helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json == job  # the drawn seed is stored


def test_train_job_keeps_what_was_given(helper, auth, refs):
    validation = helper.upload_file(auth, filename="val.txt")["id"]
    body = {"type": "train", "training_file": refs["train"], "validation_file": validation, "seed": 7,
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64}, "suffix": "tiny-1", "metadata": {"team": "nlp"},
            "hyperparameters": {"n_epochs": 2.5, "learning_rate": 0.001}}
    job = helper.submit_job(auth, body)
    assert job["seed"] == 7 and job["validation_file"] == validation and job["suffix"] == "tiny-1"
    assert job["model"] == {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 1024}
    # warmup_steps null: a tenth of the run's steps (at most 100), once the worker knows its length
    assert job["hyperparameters"] == {**DEFAULT_HYPERPARAMETERS, "max_steps": None, "n_epochs": 2.5,
                                      "learning_rate": 0.001, "warmup_steps": None}
    assert job["metadata"] == {"team": "nlp"}


def test_finetune_job_names_its_base_model(helper, auth, refs):
    job = helper.submit_job(auth, {"type": "finetune", "training_file": refs["train"], "model": refs["model"]})
    assert job["type"] == "finetune" and job["model"] == refs["model"] and job["status"] == "queued"
    assert job["hyperparameters"] == DEFAULT_HYPERPARAMETERS
    assert helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json == job


def test_generate_job_with_inline_prompts(helper, auth, refs):
    job = helper.submit_job(auth, {"type": "generate", "model": refs["model"], "prompts": ["a", "b", "c"],
                                   "sampling": {"temperature": 0.7, "stop": ["\n"]}})
    assert job["type"] == "generate" and job["model"] == refs["model"] and job["input_file"] is None
    assert job["prompt_count"] == 3 and "prompts" not in job
    assert job["sampling"] == {**DEFAULT_SAMPLING, "temperature": 0.7, "stop": ["\n"], "seed": job["sampling"]["seed"]}
    assert isinstance(job["sampling"]["seed"], int)
    assert job["progress"] == {"total": 3, "completed": 0, "failed": 0}
    assert helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json == job


def test_generate_job_with_an_input_file(helper, auth, refs):
    job = helper.submit_job(auth, {"type": "generate", "model": refs["model"], "input_file": refs["generate"],
                                   "sampling": {"seed": 3}})
    assert job["input_file"] == refs["generate"] and job["sampling"]["seed"] == 3 and "prompt_count" not in job
    assert job["progress"] == {"total": 2, "completed": 0, "failed": 0}  # the file's two prompts


@pytest.mark.parametrize(
    "body, task, queue",
    [
        ({"type": "train", "training_file": "{train}"}, "gpt2jobs.train", "train"),
        ({"type": "finetune", "training_file": "{train}", "model": "{model}"}, "gpt2jobs.finetune", "train"),
        ({"type": "generate", "model": "{model}", "prompts": ["x"]}, "gpt2jobs.generate", "generate"),
    ],
)
def test_a_submitted_job_is_in_the_broker(helper, auth, refs, body, task, queue):
    assert helper.broker_messages() == []
    job = helper.submit_job(auth, fill(body, refs))
    assert helper.broker_messages() == [{"task": task, "args": [job["id"]], "queue": queue}]


# Refused submissions: nothing is stored, nothing is enqueued


@pytest.fixture
def nothing_submitted(helper, auth, refs):
    """A job submitted before a refused one: afterwards it is the only job, unchanged, and the only message."""
    job = helper.submit_job(auth, {"type": "train", "training_file": refs["train"]})
    yield
    assert job_ids(helper, auth) == [job["id"]]
    assert helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json == job
    assert [message["args"] for message in helper.broker_messages()] == [[job["id"]]]


@pytest.mark.parametrize(
    "body, content_type",
    [('{"type": "train"}', "text/plain"), ("type=train", "application/x-www-form-urlencoded"), ("", None)],
)
def test_a_body_that_is_not_json_is_415(helper, auth, nothing_submitted, body, content_type):
    response = helper.client.post("/v1/jobs", data=body, content_type=content_type, headers=auth)
    assert_error(response, 415, "unsupported_media_type", None)


@pytest.mark.parametrize(
    "body", ['{"type": "train",', "", "{'type': 'train'}", "[" * 50_000, '{"seed": 1' + "0" * 5000 + "}"],
    ids=["truncated", "empty", "single quotes", "nested too deep", "integer too long"],
)
def test_invalid_json_is_400(helper, auth, nothing_submitted, body):
    response = helper.client.post("/v1/jobs", data=body, content_type="application/json", headers=auth)
    assert_error(response, 400, "invalid_json", "body")


INVALID_BODIES = {
    "not an object": (["train"], "body"),
    "null": (None, "body"),
    "missing type": ({"training_file": "{train}"}, "type"),
    "unknown type": ({"type": "pretrain", "training_file": "{train}"}, "type"),
    "type not a string": ({"type": 1, "training_file": "{train}"}, "type"),
    "missing training_file": ({"type": "train"}, "training_file"),
    "training_file not a string": ({"type": "train", "training_file": 5}, "training_file"),
    "unknown field": ({"type": "train", "training_file": "{train}", "epochs": 3}, "epochs"),
    "unknown hyperparameter": ({"type": "train", "training_file": "{train}", "hyperparameters": {"lr": 1}},
                               "hyperparameters.lr"),
    "eval_every absurdly large": ({"type": "train", "training_file": "{train}",
                                   "hyperparameters": {"eval_every": 10**30}}, "hyperparameters.eval_every"),
    "learning_rate too high": ({"type": "train", "training_file": "{train}",
                                "hyperparameters": {"learning_rate": 2}}, "hyperparameters.learning_rate"),
    "learning_rate zero": ({"type": "train", "training_file": "{train}", "hyperparameters": {"learning_rate": 0}},
                           "hyperparameters.learning_rate"),
    "max_steps and n_epochs": ({"type": "train", "training_file": "{train}",
                                "hyperparameters": {"max_steps": 10, "n_epochs": 1}}, "hyperparameters.n_epochs"),
    "n_embd not divisible by n_head": ({"type": "train", "training_file": "{train}",
                                        "model": {"n_layer": 2, "n_head": 3, "n_embd": 64}}, "model"),
    "model shape out of range": ({"type": "train", "training_file": "{train}",
                                  "model": {"n_layer": 99, "n_head": 2, "n_embd": 64}}, "model.n_layer"),
    "model shape unknown key": ({"type": "train", "training_file": "{train}",
                                 "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "depth": 1}}, "model.depth"),
    "unknown preset": ({"type": "train", "training_file": "{train}", "model": "gpt3"}, "model"),
    "seed negative": ({"type": "train", "training_file": "{train}", "seed": -1}, "seed"),
    "seed too big": ({"type": "train", "training_file": "{train}", "seed": 2**63}, "seed"),
    "suffix with a slash": ({"type": "train", "training_file": "{train}", "suffix": "a/b"}, "suffix"),
    "metadata too many keys": ({"type": "train", "training_file": "{train}",
                                "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    "metadata value not a string": ({"type": "train", "training_file": "{train}", "metadata": {"k": 1}},
                                    "metadata.k"),
    "finetune model not a model id": ({"type": "finetune", "training_file": "{train}", "model": "gpt2"}, "model"),
    "finetune without a model": ({"type": "finetune", "training_file": "{train}"}, "model"),
    "generate with prompts and input_file": ({"type": "generate", "model": "{model}", "prompts": ["a"],
                                              "input_file": "{generate}"}, "input_file"),
    "generate with neither": ({"type": "generate", "model": "{model}"}, "input_file"),
    "generate with no prompts": ({"type": "generate", "model": "{model}", "prompts": []}, "prompts"),
    "prompt not a string": ({"type": "generate", "model": "{model}", "prompts": ["a", 2]}, "prompts.1"),
    "too many inline prompts": ({"type": "generate", "model": "{model}", "prompts": ["p"] * 1001}, "prompts"),
    "temperature out of range": ({"type": "generate", "model": "{model}", "prompts": ["a"],
                                  "sampling": {"temperature": 5.5}}, "sampling.temperature"),
    "top_p zero": ({"type": "generate", "model": "{model}", "prompts": ["a"], "sampling": {"top_p": 0}},
                   "sampling.top_p"),
    "too many stop strings": ({"type": "generate", "model": "{model}", "prompts": ["a"],
                               "sampling": {"stop": ["a", "b", "c", "d", "e"]}}, "sampling.stop"),
    "lone surrogate in a prompt": ({"type": "generate", "model": "{model}", "prompts": ["ok", "a\ud800b"]},
                                   "prompts.1"),
    "lone surrogate in metadata": ({"type": "train", "training_file": "{train}", "metadata": {"k": "\udfff"}},
                                   "metadata.k"),
    "NUL in a file id": ({"type": "train", "training_file": "file-\u0000"}, "training_file"),
    "integer as a string": ({"type": "train", "training_file": "{train}", "hyperparameters": {"max_steps": "5"}},
                            "hyperparameters.max_steps"),
    "warmup past max_steps": ({"type": "train", "training_file": "{train}",
                               "hyperparameters": {"max_steps": 10, "warmup_steps": 20}}, "hyperparameters.warmup_steps"),
    "keep_checkpoints zero": ({"type": "train", "training_file": "{train}", "hyperparameters": {"keep_checkpoints": 0}},
                              "hyperparameters.keep_checkpoints"),
    "keep_checkpoints as a string": ({"type": "train", "training_file": "{train}",
                                      "hyperparameters": {"keep_checkpoints": "2"}}, "hyperparameters.keep_checkpoints"),
    "keep_checkpoints fractional": ({"type": "train", "training_file": "{train}",
                                     "hyperparameters": {"keep_checkpoints": 1.5}}, "hyperparameters.keep_checkpoints"),
}


@pytest.mark.parametrize("case", INVALID_BODIES)
def test_invalid_job_is_422_naming_the_field(helper, auth, refs, nothing_submitted, case):
    body, param = INVALID_BODIES[case]
    message = assert_error(helper.submit(auth, fill(body, refs)), 422, "invalid_request", param)
    assert message.startswith(f"{param}: ")


def test_unpaired_surrogate_is_422(helper, auth, refs, nothing_submitted):
    body = '{"type": "generate", "model": "%s", "prompts": ["\\ud800"]}' % refs["model"]
    response = helper.client.post("/v1/jobs", data=body, content_type="application/json",
                                  headers={**auth, "Idempotency-Key": "k"})
    assert_error(response, 422, "invalid_request", "prompts.0")


BAD_REFERENCES = {
    "unknown training_file": ({"type": "train", "training_file": "file-000000000000000000000000"}, "training_file"),
    "training_file for generation": ({"type": "train", "training_file": "{generate}"}, "training_file"),
    "unknown validation_file": ({"type": "train", "training_file": "{train}", "validation_file": "file-x"},
                                "validation_file"),
    "input_file for training": ({"type": "generate", "model": "{model}", "input_file": "{train}"}, "input_file"),
    "unknown finetune model": ({"type": "finetune", "training_file": "{train}", "model": "model-0"}, "model"),
    "unknown generate model": ({"type": "generate", "model": "model-0", "prompts": ["a"]}, "model"),
}


@pytest.mark.parametrize("case", BAD_REFERENCES)
def test_a_reference_to_nothing_usable_is_400(helper, auth, refs, nothing_submitted, case):
    body, param = BAD_REFERENCES[case]
    assert_error(helper.submit(auth, fill(body, refs)), 400, "invalid_input", param)


def test_a_body_over_the_size_limit_is_413(make_app, auth, nothing_submitted, refs):
    small = make_app(MAX_UPLOAD_BYTES=1000).test_client()
    body = {"type": "train", "training_file": refs["train"], "metadata": {"note": "x" * 1000}}
    response = small.post("/v1/jobs", json=body, headers=auth)
    assert_error(response, 413, "too_large", "body")


def test_inline_prompt_limit_is_a_setting(make_app, auth):
    helper = ApiHelper(small := make_app(MAX_INLINE_PROMPTS=2), small.test_client())
    model = helper.create_model(auth)
    assert helper.submit(auth, {"type": "generate", "model": model, "prompts": ["a", "b"]}).status_code == 202
    response = helper.submit(auth, {"type": "generate", "model": model, "prompts": ["a", "b", "c"]})
    assert "at most 2 inline prompts" in assert_error(response, 422, "invalid_request", "prompts")


def test_keep_checkpoints_defaults_to_the_setting_and_is_stored(make_app, auth, refs):
    helper = ApiHelper(configured := make_app(KEEP_CHECKPOINTS=7), configured.test_client())
    default = helper.submit_job(auth, {"type": "train", "training_file": refs["train"]})
    assert default["hyperparameters"]["keep_checkpoints"] == 7  # GET shows what the worker will keep
    given = helper.submit_job(auth, {"type": "finetune", "training_file": refs["train"], "model": refs["model"],
                                     "hyperparameters": {"keep_checkpoints": 1}})
    assert given["hyperparameters"]["keep_checkpoints"] == 1
    assert helper.client.get(f"/v1/jobs/{given['id']}", headers=auth).json["hyperparameters"]["keep_checkpoints"] == 1
    schema = helper.client.get("/openapi.json").json["components"]["schemas"]["Hyperparameters"]["properties"]
    assert "KEEP_CHECKPOINTS" in schema["keep_checkpoints"]["description"]


# Idempotency


def test_same_key_and_body_is_the_same_job_enqueued_once(helper, auth, refs):
    body = {"type": "train", "training_file": refs["train"], "hyperparameters": {"max_steps": 5}}
    first = helper.submit(auth, body, **{"Idempotency-Key": "retry-1"})
    reordered = {"hyperparameters": {"max_steps": 5}, "training_file": refs["train"], "type": "train"}
    again = helper.submit(auth, reordered, **{"Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 202
    assert again.json == first.json and again.headers["Location"] == first.headers["Location"]
    assert job_ids(helper, auth) == [first.json["id"]]
    assert len(helper.broker_messages()) == 1

    other = helper.submit_job(auth, body, **{"Idempotency-Key": "retry-2"})
    assert other["id"] != first.json["id"] and len(helper.broker_messages()) == 2


def test_same_key_with_another_body_is_409(helper, auth, refs):
    job = helper.submit_job(auth, {"type": "train", "training_file": refs["train"]}, **{"Idempotency-Key": "k"})
    response = helper.submit(auth, {"type": "train", "training_file": refs["train"], "seed": 1},
                             **{"Idempotency-Key": "k"})
    assert "already used" in assert_error(response, 409, "conflict", "Idempotency-Key")
    assert job_ids(helper, auth) == [job["id"]] and len(helper.broker_messages()) == 1


def test_key_length_is_checked(helper, auth, refs):
    body = {"type": "train", "training_file": refs["train"]}
    assert helper.submit(auth, body, **{"Idempotency-Key": "k" * 255}).status_code == 202
    assert_error(helper.submit(auth, body, **{"Idempotency-Key": "k" * 256}), 400, "invalid_request",
                 "Idempotency-Key")
    assert_error(helper.submit(auth, body, **{"Idempotency-Key": ""}), 400, "invalid_request", "Idempotency-Key")
    assert len(job_ids(helper, auth)) == 1


def test_keys_are_per_owner(helper, auth, other_auth, refs):
    mine = helper.submit_job(auth, {"type": "train", "training_file": refs["train"]}, **{"Idempotency-Key": "k"})
    other_file = helper.upload_file(other_auth)["id"]
    theirs = helper.submit_job(other_auth, {"type": "train", "training_file": other_file},
                               **{"Idempotency-Key": "k"})
    assert theirs["id"] != mine["id"] and theirs["training_file"] == other_file


# Broker down: the job is stored and acknowledged (the database is the source of truth); the workers'
# reconciliation sends it once the broker answers (tests/workers/test_recovery.py).


def test_unreachable_broker_still_stores_and_acknowledges_the_job(helper, make_app, auth, refs):
    down = make_app(BROKER_URL="redis://127.0.0.1:1/0").test_client()
    body = {"type": "train", "training_file": refs["train"]}
    response = down.post("/v1/jobs", json=body, headers={**auth, "Idempotency-Key": "once"})
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job_ids(helper, auth) == [job["id"]] and job["status"] == "queued" and helper.broker_messages() == []
    events = helper.client.get(f"/v1/jobs/{job['id']}/events", headers=auth).get_json()["data"]
    assert "sent to the workers as soon as the queue answers" in events[-1]["message"]

    # The same key again returns the stored job, without a second one.
    again = helper.submit(auth, body, **{"Idempotency-Key": "once"})
    assert again.get_json()["id"] == job["id"] and job_ids(helper, auth) == [job["id"]]


# Listing


def test_list_is_newest_first_with_type_and_status_filters(helper, auth, refs):
    train = helper.train_job(auth, training_file=refs["train"])["id"]
    generate = helper.generate_job(auth, model=refs["model"])["id"]
    finetune = helper.submit_job(auth, {"type": "finetune", "training_file": refs["train"], "model": refs["model"]})
    helper.set_status(train, "running")

    assert job_ids(helper, auth) == [finetune["id"], generate, train]
    assert job_ids(helper, auth, "?type=generate") == [generate]
    assert job_ids(helper, auth, "?status=queued") == [finetune["id"], generate]
    assert job_ids(helper, auth, "?status=running&type=train") == [train]
    assert job_ids(helper, auth, "?status=running&type=finetune") == []
    assert "queued, running" in assert_error(helper.client.get("/v1/jobs?status=done", headers=auth), 400,
                                             "invalid_request", "status")
    assert_error(helper.client.get("/v1/jobs?type=pretrain", headers=auth), 400, "invalid_request", "type")


def test_job_paging(helper, auth, refs):
    ids = [helper.train_job(auth, training_file=refs["train"])["id"] for _ in range(4)][::-1]
    pages = helper.walk("/v1/jobs", auth, limit=1)
    assert [page["data"][0]["id"] for page in pages] == ids and pages[-1]["has_more"] is False
    pages = helper.walk("/v1/jobs", auth, limit=3, type="train")
    assert [[job["id"] for job in page["data"]] for page in pages] == [ids[:3], ids[3:]]
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("limit=abc", "limit"),
                         ("after=job-000000000000000000000000", "after")):
        response = helper.client.get(f"/v1/jobs?{query}", headers=auth)
        assert response.status_code == 400 and response.json["error"]["param"] == param


def test_unknown_job_is_404(helper, auth):
    for method, suffix in (("get", ""), ("post", "/cancel"), ("get", "/events"), ("get", "/checkpoints"),
                           ("get", "/results"), ("get", "/results.jsonl")):
        response = getattr(helper.client, method)(f"/v1/jobs/job-000000000000000000000000{suffix}", headers=auth)
        assert "No job with id" in assert_error(response, 404, "not_found", None)


# Cancelling


def test_cancel_a_queued_job(helper, auth):
    job = helper.train_job(auth)
    response = helper.client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert response.status_code == 200
    assert response.json["status"] == "cancelled" and isinstance(response.json["finished_at"], int)
    assert helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json == response.json
    events = helper.client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json["data"]
    assert [event["message"] for event in events] == [f"Created train job {job['id']}",
                                                      "Job cancelled before it started"]

    again = helper.client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert "already finished (cancelled)" in assert_error(again, 409, "conflict", None)
    assert again.headers["x-should-retry"] == "false"  # the openai SDK would otherwise retry a 409


def test_cancel_a_running_job_asks_the_worker(helper, auth):
    job = helper.train_job(auth)
    helper.set_status(job["id"], "running")
    response = helper.client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert response.status_code == 200 and response.json["status"] == "cancelling"
    assert isinstance(response.json["started_at"], int) and response.json["finished_at"] is None
    # Asking again changes nothing; once the worker has finished, it is too late.
    assert helper.client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json["status"] == "cancelling"
    helper.set_status(job["id"], "cancelled")
    assert_error(helper.client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth), 409, "conflict", None)


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_cancel_a_finished_job_is_409(helper, auth, status):
    job = helper.train_job(auth)
    helper.set_status(job["id"], "running", status)
    assert_error(helper.client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth), 409, "conflict", None)
    assert helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json["status"] == status


# Events, checkpoints, results


def test_events_are_oldest_first_and_page_by_id(helper, auth):
    job = helper.train_job(auth)
    added = helper.add_events(job["id"], [f"step {i}" for i in range(4)])
    events = helper.client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json["data"]
    assert [e["message"] for e in events] == [f"Created train job {job['id']}"] + [f"step {i}" for i in range(4)]
    assert [e["id"] for e in events[1:]] == added
    assert set(events[0]) == {"id", "object", "created_at", "level", "type", "message", "data"}
    assert events[0]["object"] == "job.event" and events[0]["level"] == "info"

    pages = helper.walk(f"/v1/jobs/{job['id']}/events", auth, limit=2)
    assert [[e["id"] for e in page["data"]] for page in pages] == [[events[0]["id"], added[0]], added[1:3], added[3:]]
    after_last = helper.client.get(f"/v1/jobs/{job['id']}/events?after={added[-1]}", headers=auth).json
    assert after_last["data"] == [] and after_last["has_more"] is False
    for query in ("after=abc", "after=-1", "after=1.0", f"after={2**40}", "after=" + "9" * 40):
        assert_error(helper.client.get(f"/v1/jobs/{job['id']}/events?{query}", headers=auth), 400,
                     "invalid_request", "after")
    assert_error(helper.client.get(f"/v1/jobs/{job['id']}/events?limit=0", headers=auth), 400,
                 "invalid_request", "limit")


def test_checkpoints_are_listed_by_step(helper, auth):
    job = helper.train_job(auth)
    assert helper.client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=auth).json["data"] == []
    helper.add_checkpoints(job["id"], [500, 100, 1000])
    listed = helper.client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=auth).json
    assert [c["step"] for c in listed["data"]] == [100, 500, 1000] and listed["has_more"] is False
    first = listed["data"][0]
    assert first["id"].startswith("ckpt-") and first["object"] == "job.checkpoint"
    assert first["train_loss"] == pytest.approx(0.1) and first["val_loss"] is None and first["bytes"] == 1100
    assert isinstance(first["created_at"], int) and "storage_path" not in first
    assert (listed["first_id"], listed["last_id"]) == (first["id"], listed["data"][-1]["id"])


@pytest.fixture
def generate_job(helper, auth):
    """A generate job with five results, stored out of order as workers may finish them."""
    job = helper.generate_job(auth, prompts=[f"prompt {i}" for i in range(5)])
    helper.add_results(job["id"], [3, 0, 4, 2, 1])
    return job


def test_results_are_in_input_order_and_page_by_index(helper, auth, generate_job):
    url = f"/v1/jobs/{generate_job['id']}/results"
    listed = helper.client.get(url, headers=auth).json
    assert [r["index"] for r in listed["data"]] == [0, 1, 2, 3, 4] and listed["has_more"] is False
    assert listed["data"][2] == {"id": 2, "index": 2, "custom_id": "c2", "prompt": "prompt 2",
                                 "completions": [{"text": " completion 2", "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 2, "completion_tokens": 3}, "error": None}
    pages = helper.walk(url, auth, limit=2)
    assert [[r["index"] for r in page["data"]] for page in pages] == [[0, 1], [2, 3], [4]]
    assert helper.client.get(f"{url}?after=4", headers=auth).json["data"] == []
    assert_error(helper.client.get(f"{url}?after=x", headers=auth), 400, "invalid_request", "after")


@pytest.mark.parametrize("page_size", [100, 2])
def test_results_jsonl_streams_every_result_in_order(helper, auth, generate_job, monkeypatch, page_size):
    # With pages of 2, the stream reads the results in several queries.
    monkeypatch.setattr(importlib.import_module("api.jobs"), "RESULTS_PAGE", page_size)
    response = helper.client.get(f"/v1/jobs/{generate_job['id']}/results.jsonl", headers=auth)
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    assert f"{generate_job['id']}-results.jsonl" in response.headers["Content-Disposition"]
    lines = [json.loads(line) for line in response.data.decode().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]
    assert all(set(line) == {"custom_id", "index", "prompt", "completions", "usage", "error"} for line in lines)
    assert lines[0]["custom_id"] == "c0" and lines[0]["completions"][0]["text"] == " completion 0"


def test_results_of_an_unfinished_job_say_they_are_partial(helper, auth):
    job = helper.generate_job(auth, prompts=[f"prompt {i}" for i in range(4)])
    added: set[int] = set()
    for status, done, partial in (("queued", [], "true"), ("running", [2, 0], "true"),
                                  ("succeeded", [2, 0, 1, 3], "false")):
        if status != "queued":
            helper.set_status(job["id"], status)
        helper.add_results(job["id"], [i for i in done if i not in added])
        added.update(done)
        for suffix in ("results", "results.jsonl"):
            response = helper.client.get(f"/v1/jobs/{job['id']}/{suffix}", headers=auth)
            assert response.status_code == 200
            assert (response.headers["Job-Status"], response.headers["Results-Partial"]) == (status, partial)
            if suffix == "results":
                assert [r["index"] for r in response.json["data"]] == sorted(done)  # the results so far, in order
            else:
                assert [json.loads(line)["index"] for line in response.data.decode().splitlines()] == sorted(done)


def test_a_train_job_has_no_results(helper, auth):
    job = helper.train_job(auth)
    for suffix in ("results", "results.jsonl"):
        response = helper.client.get(f"/v1/jobs/{job['id']}/{suffix}", headers=auth)
        assert "train jobs have no generation results" in assert_error(response, 400, "invalid_request", "job_id")
