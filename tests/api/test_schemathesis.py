"""Contract fuzzing: schemathesis, with every check it has (`st run --checks all`), against the `/openapi.json` that a
real API process serves (gunicorn, as docker compose runs it), on SQLite and on PostgreSQL.

What must hold: no 5xx; no answer the document does not declare (status, media type, headers, body); no
schema-invalid request accepted; no schema-valid request refused, except by the rules listed in REFUSALS, which
depend on what is stored or on another field and so cannot be written in JSON Schema; a method the path does not
take is a 405 naming the ones it does (Allow); a request without the key is a 401; a deleted resource is gone; an
object one owner created is not found with another owner's key (two owners, alice and bob, are peers).

The run is bounded (MAX_EXAMPLES per operation and phase on PostgreSQL, the production database, half as many on
SQLite; a fixed seed, deterministic generation, so every run sends the same requests): about 35 and 20 seconds on
a busy 2-core machine.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.engine import Status, from_schema
from schemathesis.engine import events

from tests.conftest import ServiceProcess
from tests.e2e.conftest import Api, Stack

from .conftest import GENERATE_JSONL, TRAIN_TEXT
from .test_models import checkpoint, tar_bytes

MAX_EXAMPLES = 40
SEED = 20261124
#: The failure code schemathesis gives a schema-valid request that was refused (positive_data_acceptance).
REJECTED_VALID_REQUEST = "ST202"


@dataclass(frozen=True)
class Refusal:
    """A refusal of a schema-valid request that no JSON Schema can state: the error the server answers
    (operation, status, error code, the params at fault) and why the document cannot rule it out."""

    operation: str
    status: int
    code: str
    params: frozenset[str]
    why: str

    def matches(self, operation: str, status: int, error: dict[str, Any]) -> bool:
        return (operation, status, error.get("code")) == (self.operation, self.status, self.code) and \
            error.get("param") in self.params


def refusal(operation: str, status: int, code: str, params: set[str], why: str) -> Refusal:
    return Refusal(operation, status, code, frozenset(params), why)


CURSOR = "`after` must be the id of an item of the caller's, which only the stored rows can tell"
REFUSALS = [
    refusal("GET /v1/files", 400, "invalid_input", {"after"}, CURSOR),
    refusal("GET /v1/jobs", 400, "invalid_input", {"after"}, CURSOR),
    refusal("GET /v1/models", 400, "invalid_input", {"after"}, CURSOR),
    refusal("GET /v1/batches", 400, "invalid_input", {"after"}, CURSOR),
    refusal("GET /v1/fine_tuning/jobs", 400, "invalid_input", {"after"}, CURSOR),
    refusal("GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", 400, "invalid_request", {"after"}, CURSOR),
    refusal("POST /v1/fine_tuning/jobs", 400, "invalid_input", {"training_file", "validation_file", "model"},
            "a referenced file or model must be the caller's, and a file must have a training purpose"),
    refusal("POST /v1/fine_tuning/jobs", 422, "invalid_request", {"hyperparameters", "suffix", "training_file"},
            "hyperparameters given twice (top level and method) must agree; limits that depend on the referenced "
            "model or file: enough tokens for its context, a model name '<base>:<suffix>' within 255 characters"),
    refusal("POST /v1/batches", 400, "invalid_input", {"input_file_id"},
            "the input file must be the caller's, which only the stored rows can tell"),
    refusal("POST /v1/batches", 400, "invalid_request", {"input_file_id"},
            "the input file must have been uploaded with purpose batch, which only the stored row can tell"),
    refusal("POST /v1/jobs", 400, "invalid_input", {"training_file", "validation_file", "input_file", "model"},
            "a referenced file or model must be the caller's, and a file must have the purpose its field needs"),
    refusal("POST /v1/jobs", 422, "invalid_request", {"model", "hyperparameters.warmup_steps", "devices"},
            "cross-field rules: n_embd divisible by n_head, warmup_steps within max_steps, a global batch that "
            "splits across the devices; and a context the referenced model must have"),
    refusal("POST /v1/jobs/{job_id}/resume", 422, "invalid_request", {"devices"},
            "the stored job's global batch must split across the new devices, and only training jobs have them"),
    refusal("POST /v1/jobs", 422, "invalid_request", {"training_file", "sampling.max_new_tokens", "suffix"},
            "limits that depend on the referenced model or file: enough tokens for the context, prompt and "
            "completion within the model's context, a model name '<base>:<suffix>' within 255 characters"),
    refusal("POST /v1/files", 400, "invalid_file", {"file"},
            "the content is read by the reader its jobs use (UTF-8 text or JSONL lines); a multipart schema can "
            "only say 'bytes'"),
    refusal("POST /v1/models", 400, "invalid_model", {"file"},
            "the archive must hold a GPT-2 checkpoint that loads; a multipart schema can only say 'bytes'"),
    refusal("GET /v1/jobs/{job_id}/results", 400, "invalid_request", {"job_id"},
            "only generate jobs have results; the job's type is stored state"),
    refusal("GET /v1/jobs/{job_id}/results.jsonl", 400, "invalid_request", {"job_id"},
            "only generate jobs have results; the job's type is stored state"),
    refusal("GET /v1/jobs/{job_id}/metrics", 400, "invalid_request", {"job_id"},
            "only train and finetune jobs have training metrics; the job's type is stored state"),
    refusal("GET /v1/jobs/{job_id}/metrics.csv", 400, "invalid_request", {"job_id"},
            "only train and finetune jobs have training metrics; the job's type is stored state"),
]


def explained_refusal(failure: Any, case: Any, response: Any) -> Refusal | None:
    """The REFUSALS entry that explains a refused schema-valid request, if one does."""
    if failure.code != REJECTED_VALID_REQUEST:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    label = f"{case.method.upper()} {case.operation.path}"
    return next((r for r in REFUSALS if r.matches(label, response.status_code, error)), None)


def seed(api: Api) -> None:
    """Real things for the fuzzer to find: list answers carry their ids, which schemathesis then uses in paths and
    bodies, so that operations on one item are tried on items that exist, not only on drawn ids."""
    def created(response: requests.Response, status: int) -> str:
        assert response.status_code == status, response.text
        return response.json()["id"]

    train = created(api.post("/v1/files", files={"file": ("train.txt", TRAIN_TEXT)}, data={"purpose": "train"}), 201)
    created(api.post("/v1/files", files={"file": ("prompts.jsonl", GENERATE_JSONL)}, data={"purpose": "generate"}), 201)
    model = created(api.post("/v1/models", files={"file": ("tiny.tar.gz", tar_bytes(checkpoint()))}), 201)
    requests = json.dumps({"custom_id": "q1", "method": "POST", "url": "/v1/completions",
                           "body": {"model": model, "prompt": "Hello", "max_tokens": 4}}).encode() + b"\n"
    batch_file = created(api.post("/v1/files", files={"file": ("requests.jsonl", requests)}, data={"purpose": "batch"}),
                         201)
    created(api.post("/v1/batches", json={"input_file_id": batch_file, "endpoint": "/v1/completions",
                                          "completion_window": "24h"}), 200)
    created(api.post("/v1/jobs", json={"type": "train", "training_file": train,
                                       "model": {"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8}}), 202)
    created(api.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": train}), 200)


def fuzz_config(keys: dict[str, str], folder: Path, max_examples: int = MAX_EXAMPLES) -> schemathesis.Config:
    """`st run --checks all`, bounded and seeded, as the first of `keys`' owners, with every owner a peer whose
    objects the others must not see (object_level_authorization)."""
    users = [{"name": owner, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {key}"}]}
             for owner, key in keys.items()]
    (folder / "auth.json").write_text(json.dumps({"auth": users}))
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "auth": {"wfc": {"path": str(folder / "auth.json"), "user": next(iter(keys)), "peers": list(keys)}},
        "output": {"sanitization": {"enabled": False}},  # failures show the headers that were sent
        "workers": 1,
        "checks": {"enabled": True},  # every check schemathesis has
        "generation": {"max-examples": max_examples, "deterministic": True, "database": "none"},
        "cache": {"enabled": False, "directory": str(folder)},
    })


@dataclass
class FuzzReport:
    """What a run found: failures by (code, operation, title) with an example, answers by operation and
    status, engine errors, and how often each REFUSALS entry explained a refused request."""

    failures: dict[tuple[str, str, str], str]
    statuses: dict[str, dict[int, int]]
    errors: list[str]
    explained: dict[Refusal, int]


def fuzz(base_url: str, keys: dict[str, str], folder: Path, max_examples: int = MAX_EXAMPLES) -> FuzzReport:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=fuzz_config(keys, folder, max_examples))
    report = FuzzReport({}, {}, [], {})

    @schema.hook
    def filter_failure(context, failure, case, response) -> bool:
        found = explained_refusal(failure, case, response)
        if found is not None:
            report.explained[found] = report.explained.get(found, 0) + 1
        return found is None

    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        response = recorder.find_response(case_id=case_id)
                        answer = f"{response.status_code} {response.text[:500]}" if response is not None else "no answer"
                        report.failures.setdefault(
                            (failure.code, failure.operation or recorder.label, failure.title),
                            f"{failure.message}\n{check.failure_info.code_sample}\n-> {answer}")
            for case_id, interaction in recorder.interactions.items():
                node = recorder.cases.get(case_id)
                if interaction.response is not None and node is not None:
                    case = node.value  # by the operation it was for (a stateful scenario calls many)
                    label = case.operation.label if case.method.upper() == case.operation.method.upper() else \
                        "methods the paths do not take"
                    counts = report.statuses.setdefault(label, {})
                    counts[interaction.response.status_code] = counts.get(interaction.response.status_code, 0) + 1
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            report.errors.append(repr(event))
    return report


def describe(report: FuzzReport) -> str:
    lines = [f"{code} {operation}: {title}\n    " + detail.replace("\n", "\n    ")
             for (code, operation, title), detail in sorted(report.failures.items())]
    return "\n".join(lines + report.errors)


@pytest.fixture(params=["sqlite", "postgresql"])
def served_api(request, launch: Callable[..., ServiceProcess], tmp_path: Path,
               fresh_database_url: Callable[[str], str]) -> Iterator[tuple[Stack, dict[str, str]]]:
    """A migrated database, keys of two owners, and the API under gunicorn (filesystem broker: no worker needed)."""
    environment = {"DATABASE_URL": fresh_database_url(request.param), "GPT2JOBS_VAR_DIR": str(tmp_path / "var")}
    stack = Stack(launch, environment)
    stack.migrate()
    keys = {owner: stack.create_key(owner) for owner in ("alice", "bob")}
    stack.start_api()
    yield stack, keys


def test_the_served_api_keeps_its_openapi_document(served_api, tmp_path):
    stack, keys = served_api
    assert stack.api_url is not None
    for key in keys.values():
        seed(Api(stack.api_url, key))
    started = time.monotonic()
    on_postgres = stack.environment["DATABASE_URL"].startswith("postgresql")
    report = fuzz(stack.api_url, keys, tmp_path, MAX_EXAMPLES if on_postgres else MAX_EXAMPLES // 2)
    elapsed = time.monotonic() - started
    print(f"fuzzed in {elapsed:.0f} s; answers by operation: {report.statuses}")
    print("refusals the document cannot state, met:", {f"{r.operation} {r.status} {sorted(r.params)}": n
                                                        for r, n in report.explained.items()})
    assert not report.failures and not report.errors, describe(report)
    assert all(not any(status >= 500 for status in counts) for counts in report.statuses.values()), report.statuses
    successes = {label for label, counts in report.statuses.items() if any(200 <= s < 300 for s in counts)}
    assert {"POST /v1/jobs", "GET /v1/jobs", "GET /v1/files", "GET /v1/models"} <= successes, report.statuses
