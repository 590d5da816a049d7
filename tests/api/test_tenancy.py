"""Properties of EVERY /v1 route, walked from the app's url_map so a new route cannot be left out:

* another owner's ids are 404 not_found (indistinguishable from missing) and change nothing;
* every route needs a valid, unrevoked API key (401);
* an unreachable database is 503, never 500;
* garbage input of any shape is never a 500.
"""
import io
import json
import os
import re
import tempfile
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings as hypothesis_settings, strategies as st

from api import create_app
from jobs import repository
from jobs.settings import Settings
from tests.api.conftest import GENERATE_JSONL, TRAIN_TEXT
from tests.api.test_models import checkpoint, tar_bytes

ROUTE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
#: An OpenAI batch input file of one request; MODEL is replaced by a model id.
BATCH_JSONL = b'{"custom_id": "q1", "method": "POST", "url": "/v1/completions", "body": {"model": "MODEL", "prompt": "Hi"}}\n'


def v1_routes(app) -> list[tuple[str, str]]:
    """(rule, method) for every /v1 route of `app`."""
    return sorted(
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/v1/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    )


# The routes come from a real app (no database or broker is touched by building one).
ROUTES = v1_routes(create_app(Settings.from_env({
    "GPT2JOBS_VAR_DIR": tempfile.gettempdir(), "DATABASE_URL": "sqlite:///:memory:", "BROKER_URL": "memory://",
})))
ROUTE_IDS = [f"{method} {rule}" for rule, method in ROUTES]
#: Routes the owner meets a conflict on, by the victim's make-up: its checkpoint row has no files behind it.
OWNER_CONFLICTS = {"/v1/jobs/<job_id>/checkpoints/<checkpoint_id>/model": "checkpoint_gone"}
#: Routes whose job must be a train or finetune job (a generate job has no training metrics: 400).
TRAINING_JOB_ROUTES = {"/v1/jobs/<job_id>/metrics", "/v1/jobs/<job_id>/metrics.csv"}


def url_for(rule: str, ids: dict[str, str]) -> str:
    missing = [name for name in ROUTE_ARGUMENT.findall(rule) if name not in ids]
    assert not missing, f"{rule}: no id for {missing}; give the `victim` fixture one"
    return ROUTE_ARGUMENT.sub(lambda match: quote(ids[match.group(1)], safe=""), rule)


def test_the_route_list_is_the_apps(app):
    assert v1_routes(app) == ROUTES
    assert ("/v1/files", "POST") in ROUTES and ("/v1/jobs/<job_id>/cancel", "POST") in ROUTES
    assert ("/v1/models/<model_id>/download", "GET") in ROUTES and len(ROUTES) >= 18


@pytest.fixture
def victim(helper, auth) -> dict[str, str]:
    """One of everything, owned by `auth`'s owner: ids by route argument name, plus more a body can name.

    Nothing references file_id or model_id, so their owner may delete them; the job (a generate job on another
    model, with results, a checkpoint and an idempotency key) is queued, so its owner may cancel it; train_job
    (with metric rows) stands in for it on TRAINING_JOB_ROUTES."""
    base_model = helper.create_model(auth, name="base")
    job = helper.submit_job(auth, {"type": "generate", "model": base_model, "prompts": ["a", "b"]},
                            **{"Idempotency-Key": "shared-key"})
    helper.add_results(job["id"], [1, 0])
    [checkpoint_id] = helper.add_checkpoints(job["id"], [10])
    train_job = helper.train_job(auth)["id"]
    helper.add_metrics(train_job, [1, 2])
    batch_file = helper.upload_file(auth, BATCH_JSONL.replace(b"MODEL", base_model.encode()), "requests.jsonl", "batch")
    batch = helper.client.post("/v1/batches", json={"input_file_id": batch_file["id"], "endpoint": "/v1/completions",
                                                    "completion_window": "24h"}, headers=auth).json
    assert batch["status"] == "validating", batch
    fine_tuning = helper.client.post("/v1/fine_tuning/jobs", json={"model": base_model, "training_file": helper.upload_file(
        auth)["id"]}, headers=auth).json
    assert fine_tuning["status"] == "queued", fine_tuning
    return {"file_id": helper.upload_file(auth)["id"], "job_id": job["id"], "model_id": helper.create_model(auth),
            "fine_tuning_job_id": fine_tuning["id"],
            "input_file": helper.generation_file(auth)["id"], "base_model": base_model, "train_job": train_job,
            "checkpoint_id": checkpoint_id, "batch_id": batch["id"], "batch_file": batch_file["id"]}


def snapshot(helper, headers, ids) -> dict:
    """Everything the victim can see of their resources."""

    def get(url):
        return helper.client.get(url, headers=headers)

    return {
        "file": get(f"/v1/files/{ids['file_id']}").json,
        "content": get(f"/v1/files/{ids['file_id']}/content").data,
        "job": get(f"/v1/jobs/{ids['job_id']}").json,
        "events": get(f"/v1/jobs/{ids['job_id']}/events").json,
        "results": get(f"/v1/jobs/{ids['job_id']}/results").json,
        "model": get(f"/v1/models/{ids['model_id']}").json,
        "batch": get(f"/v1/batches/{ids['batch_id']}").json,
        "lists": [get(f"/v1/{kind}?limit=100").json for kind in ("files", "jobs", "models", "batches")],
    }


def assert_not_found(response):
    assert response.status_code == 404, response.json
    assert response.json["error"]["code"] == "not_found" and response.json["error"]["param"] is None


def assert_bad_cursor(helper, url, headers, cursor):
    response = helper.client.get(url, query_string={"after": cursor}, headers=headers)
    assert response.status_code == 400 and response.json["error"]["param"] == "after", response.json


# Routes without an id: the other owner's ids must be as unknown to them as made-up ones.


def list_files_probe(helper, other, ids):
    assert helper.client.get("/v1/files", headers=other).json["data"] == []
    assert helper.client.get("/v1/files?purpose=train", headers=other).json["data"] == []
    assert_bad_cursor(helper, "/v1/files", other, ids["file_id"])


def upload_file_probe(helper, other, ids):
    mine = helper.upload_file(other)
    assert [f["id"] for f in helper.client.get("/v1/files", headers=other).json["data"]] == [mine["id"]]


def list_jobs_probe(helper, other, ids):
    assert helper.client.get("/v1/jobs", headers=other).json["data"] == []
    assert helper.client.get("/v1/jobs?type=generate&status=queued", headers=other).json["data"] == []
    assert_bad_cursor(helper, "/v1/jobs", other, ids["job_id"])


def submit_job_probe(helper, other, ids):
    own_file, own_model = helper.upload_file(other)["id"], helper.create_model(other)
    for body, param in (
        ({"type": "train", "training_file": ids["file_id"]}, "training_file"),
        ({"type": "train", "training_file": own_file, "validation_file": ids["file_id"]}, "validation_file"),
        ({"type": "generate", "model": own_model, "input_file": ids["input_file"]}, "input_file"),
        ({"type": "generate", "model": ids["model_id"], "prompts": ["x"]}, "model"),
        ({"type": "finetune", "training_file": own_file, "model": ids["base_model"]}, "model"),
    ):
        response = helper.submit(other, body)
        assert response.status_code == 400, response.json
        assert response.json["error"]["param"] == param and "No " in response.json["error"]["message"]
    # The victim's idempotency key means nothing to another owner: a new job of their own.
    job = helper.submit_job(other, {"type": "train", "training_file": own_file}, **{"Idempotency-Key": "shared-key"})
    assert job["id"] != ids["job_id"] and job["training_file"] == own_file


def list_models_probe(helper, other, ids):
    assert helper.client.get("/v1/models", headers=other).json["data"] == []
    assert_bad_cursor(helper, "/v1/models", other, ids["model_id"])


def import_model_probe(helper, other, ids):
    response = helper.client.post("/v1/models", data={"file": (io.BytesIO(tar_bytes(checkpoint())), "m.tar.gz")},
                                  headers=other, content_type="multipart/form-data")
    assert response.status_code == 201, response.json
    assert [m["id"] for m in helper.client.get("/v1/models", headers=other).json["data"]] == [response.json["id"]]


def list_batches_probe(helper, other, ids):
    assert helper.client.get("/v1/batches", headers=other).json["data"] == []
    assert_bad_cursor(helper, "/v1/batches", other, ids["batch_id"])


def create_batch_probe(helper, other, ids):
    body = {"input_file_id": ids["batch_file"], "endpoint": "/v1/completions", "completion_window": "24h"}
    response = helper.client.post("/v1/batches", json=body, headers=other)  # as a missing file: 400 naming it
    assert response.status_code == 400 and response.json["error"]["param"] == "input_file_id", response.json
    # Their own file naming the victim's model: the batch is theirs, failed, and the model is not found.
    own = helper.upload_file(other, BATCH_JSONL.replace(b"MODEL", ids["base_model"].encode()), "mine.jsonl", "batch")
    batch = helper.client.post("/v1/batches", json={**body, "input_file_id": own["id"]}, headers=other).json
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "model_not_found"
    assert [b["id"] for b in helper.client.get("/v1/batches", headers=other).json["data"]] == [batch["id"]]


def list_fine_tuning_jobs_probe(helper, other, ids):
    assert helper.client.get("/v1/fine_tuning/jobs", headers=other).json["data"] == []
    assert_bad_cursor(helper, "/v1/fine_tuning/jobs", other, ids["fine_tuning_job_id"])


def create_fine_tuning_job_probe(helper, other, ids):
    body = {"model": ids["base_model"], "training_file": ids["file_id"]}
    response = helper.client.post("/v1/fine_tuning/jobs", json=body, headers=other)
    assert response.status_code == 400 and response.json["error"]["param"] == "model", response.json
    own_model = helper.create_model(other)
    response = helper.client.post("/v1/fine_tuning/jobs", json={**body, "model": own_model}, headers=other)
    assert response.status_code == 400 and response.json["error"]["param"] == "training_file", response.json


COLLECTION_PROBES = {
    ("/v1/files", "GET"): list_files_probe,
    ("/v1/files", "POST"): upload_file_probe,
    ("/v1/jobs", "GET"): list_jobs_probe,
    ("/v1/jobs", "POST"): submit_job_probe,
    ("/v1/models", "GET"): list_models_probe,
    ("/v1/models", "POST"): import_model_probe,
    ("/v1/batches", "GET"): list_batches_probe,
    ("/v1/batches", "POST"): create_batch_probe,
    ("/v1/fine_tuning/jobs", "GET"): list_fine_tuning_jobs_probe,
    ("/v1/fine_tuning/jobs", "POST"): create_fine_tuning_job_probe,
}


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_another_owners_resources_are_not_found_and_unchanged(helper, auth, other_auth, victim, route):
    rule, method = route
    if rule.endswith("/resume"):  # a job its owner may resume
        assert helper.client.post(f"/v1/jobs/{victim['job_id']}/pause", headers=auth).json["status"] == "paused"
        assert helper.client.post(f"/v1/jobs/{victim['fine_tuning_job_id']}/pause",
                                  headers=auth).json["status"] == "paused"
    before = snapshot(helper, auth, victim)
    if ROUTE_ARGUMENT.search(rule):
        url = url_for(rule, {**victim, "job_id": victim["train_job"]} if rule in TRAINING_JOB_ROUTES else victim)
        assert_not_found(helper.client.open(url, method=method, headers=other_auth))
        assert snapshot(helper, auth, victim) == before
        # The same request by the owner works: the 404 was about whose resource it is.
        response = helper.client.open(url, method=method, headers=auth)
        if rule in OWNER_CONFLICTS:
            assert response.json["error"]["code"] == OWNER_CONFLICTS[rule], response.json
        else:
            assert response.status_code < 300, response.json
    else:
        probe = COLLECTION_PROBES.get(route)
        assert probe is not None, f"{method} {rule} has no tenancy probe: add one to COLLECTION_PROBES"
        probe(helper, other_auth, victim)
        assert snapshot(helper, auth, victim) == before


# Authentication


@pytest.fixture
def revoked_key(helper) -> dict[str, str]:
    with helper.session() as session:
        key, secret = repository.create_api_key(session, "revoked-owner")
    headers = {"Authorization": f"Bearer {secret}"}
    assert helper.client.get("/v1/files", headers=headers).status_code == 200
    with helper.session() as session:
        repository.revoke_api_key(session, "revoked-owner", key.id)
    return headers


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_every_route_needs_a_valid_key(helper, auth, revoked_key, route):
    rule, method = route
    url = ROUTE_ARGUMENT.sub("x-1", rule)
    secret = auth["Authorization"].split(" ", 1)[1]
    for headers, code in (
        ({}, "missing_api_key"),
        ({"Authorization": f"Basic {secret}"}, "invalid_api_key"),
        ({"Authorization": secret}, "invalid_api_key"),
        ({"Authorization": "Bearer "}, "invalid_api_key"),
        ({"Authorization": "Bearer sk-not-a-key"}, "invalid_api_key"),
        (revoked_key, "invalid_api_key"),
    ):
        response = helper.client.open(url, method=method, headers=headers)
        assert response.status_code == 401, (headers, response.json)
        assert response.json["error"]["code"] == code and response.json["error"]["param"] is None
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")


def test_the_scheme_is_case_insensitive(helper, auth):
    secret = auth["Authorization"].split(" ", 1)[1]
    assert helper.client.get("/v1/files", headers={"Authorization": f"bearer {secret}"}).status_code == 200


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_an_unreachable_database_is_503_on_every_route(offline_database_app, route):
    rule, method = route
    response = offline_database_app.test_client().open(
        ROUTE_ARGUMENT.sub("x-1", rule), method=method, headers={"Authorization": "Bearer sk-anything"}
    )
    assert response.status_code == 503, response.json
    assert response.json["error"]["code"] == "database_unavailable"


# Garbage in, never a 500

TEXT = st.text(st.one_of(st.characters(), st.sampled_from("\x00\ud800\udfff\n\"'/\\é☃")), max_size=20)
URL_TEXT = st.text(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from("\x00/%?#é☃")), max_size=20)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=300)
INTS = st.one_of(st.integers(), st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**30]))
NUMBERS = st.one_of(INTS, st.floats())
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)),
    max_leaves=12,
)
CONTENT_TYPES = ["application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=x",
                 "application/x-www-form-urlencoded", "application/octet-stream", ""]
HYPERPARAMETERS = ["max_steps", "n_epochs", "batch_size", "learning_rate", "warmup_steps", "eval_every", "lr"]
SAMPLING = ["max_new_tokens", "temperature", "top_k", "top_p", "stop", "n", "seed", "nope"]


FILE_CONTENTS = [TRAIN_TEXT, GENERATE_JSONL, tar_bytes(checkpoint()), b"[" * 100_000 + b"\n",
                 b'{"text": "a", "n": 1' + b"0" * 5000 + b"}\n", b'{"custom_id": "a", "prompt": "\\u0000"}\n']


def weighted(*choices):
    """One of the strategies, each drawn about as often as it is named."""
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


def requests(victim: dict[str, str], rule: str, method: str):
    """A strategy for one request to `rule`: path ids, query, headers and a body, mostly wrong but often close
    enough to right to get past the first checks."""
    ids = sorted(victim.values())
    some_id = weighted(st.sampled_from(ids), st.sampled_from(ids), URL_TEXT)
    fields = {
        "training_file": weighted(some_id, JSON), "validation_file": some_id, "input_file": some_id,
        "model": weighted(some_id, st.just("gpt2"),
                          st.dictionaries(st.sampled_from(["n_layer", "n_head", "n_embd", "block_size"]), INTS)),
        "prompts": weighted(st.lists(TEXT, max_size=3), st.lists(TEXT, max_size=3), JSON),
        "hyperparameters": st.dictionaries(st.sampled_from(HYPERPARAMETERS), weighted(NUMBERS, NUMBERS, TEXT)),
        "sampling": st.dictionaries(st.sampled_from(SAMPLING), weighted(NUMBERS, NUMBERS, TEXT, st.lists(TEXT))),
        "seed": INTS, "metadata": st.dictionaries(TEXT, weighted(TEXT, TEXT, JSON), max_size=3), "suffix": TEXT,
    }
    job_body = st.fixed_dictionaries(
        {"type": weighted(st.sampled_from(["train", "finetune", "generate"]), JSON)}, optional=fields
    )
    # A valid body with one field replaced by something drawn from the wild.
    valid = [{"type": "train", "training_file": victim["file_id"]},
             {"type": "finetune", "training_file": victim["file_id"], "model": victim["base_model"]},
             {"type": "generate", "model": victim["base_model"], "prompts": ["a"]}]
    one_field = st.sampled_from(sorted(fields)).flatmap(lambda name: fields[name].map(lambda value: {name: value}))
    near_valid = st.builds(lambda base, change: {**base, **change}, st.sampled_from(valid), one_field)
    upload = st.fixed_dictionaries(
        {"file": st.tuples(weighted(st.binary(max_size=200), st.sampled_from(FILE_CONTENTS)),
                           weighted(URL_TEXT, st.sampled_from(["a.txt", "b.jsonl", "m.tar.gz"])))},
        optional={"purpose": weighted(st.sampled_from(["train", "generate"]), URL_TEXT), "name": URL_TEXT},
    ).map(lambda form: {**form, "file": (io.BytesIO(form["file"][0]), form["file"][1])})
    json_body = st.builds(lambda value: {"json": value}, weighted(JSON, job_body, near_valid, near_valid,
                                                                 st.sampled_from(valid)))
    multipart = st.builds(lambda form: {"data": form, "content_type": "multipart/form-data"}, upload)
    raw = st.builds(lambda data, kind: {"data": data, "content_type": kind},
                    weighted(st.binary(max_size=100), JSON.map(json.dumps)), st.sampled_from(CONTENT_TYPES))
    if method != "POST":
        body = weighted(st.just({}), st.just({}), raw)
    elif rule == "/v1/jobs":
        body = weighted(json_body, json_body, json_body, raw, multipart, st.just({}))
    else:
        body = weighted(multipart, multipart, multipart, json_body, raw, st.just({}))
    return st.fixed_dictionaries({
        "path": st.fixed_dictionaries({name: weighted(st.just(victim[name]), st.just(victim[name]), some_id)
                                       for name in ROUTE_ARGUMENT.findall(rule)}),
        "query": st.dictionaries(st.sampled_from(["limit", "after", "purpose", "type", "status", "x"]),
                                 weighted(URL_TEXT, INTS.map(str), st.sampled_from(ids)), max_size=3),
        "owner": st.sampled_from(["auth", "auth", "auth", "other_auth"]),
        "idempotency_key": weighted(st.none(), st.none(), HEADER_TEXT),
        "body": body,
    })


# A fixed, modest set of examples by default; API_FUZZ_EXAMPLES=500 API_FUZZ_RANDOM=1 explores further.
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@hypothesis_settings(max_examples=int(os.environ.get("API_FUZZ_EXAMPLES", "20")), deadline=None, database=None,
                     derandomize=not os.environ.get("API_FUZZ_RANDOM"),
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_garbage_is_never_a_500(helper, auth, other_auth, victim, route, data):
    rule, method = route
    request = data.draw(requests(victim, rule, method))
    headers = dict(auth if request["owner"] == "auth" else other_auth)
    if request["idempotency_key"] is not None:
        headers["Idempotency-Key"] = request["idempotency_key"]
    response = helper.client.open(url_for(rule, request["path"]), method=method, query_string=request["query"],
                                  headers=headers, **request["body"])
    event(f"status {response.status_code}")  # see --hypothesis-show-statistics
    assert response.status_code < 500, response.get_data()[:500]
    if response.status_code >= 400:
        assert set(response.json["error"]) == {"code", "message", "param"}, response.json


def json_bomb(payload: bytes) -> bytes:
    """A model archive whose config.json is `payload`."""
    return tar_bytes(checkpoint() | {"config.json": payload})


@pytest.mark.parametrize("archive", [
    json_bomb(b"[" * 100_000),
    json_bomb(b'{"model_type": "gpt2", "n_embd": 1' + b"0" * 5000 + b"}"),
    tar_bytes(checkpoint(weights=(100_000).to_bytes(8, "little") + b"[" * 100_000)),
], ids=["deep config.json", "huge integer in config.json", "deep safetensors header"])
def test_model_archives_with_pathological_json_are_400(helper, auth, archive):
    response = helper.client.post("/v1/models", data={"file": (io.BytesIO(archive), "m.tar.gz")}, headers=auth,
                                  content_type="multipart/form-data")
    assert response.status_code == 400, response.json
    assert helper.artifact_files() == []
