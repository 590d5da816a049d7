"""/v1/batches (OpenAI's Batch API over our generate jobs) and the OpenAI-shaped /v1/files, through the app's
routes and through the unmodified `openai` SDK, on SQLite and PostgreSQL. Running a batch through a worker is
tests/workers/test_batches_run.py; finalization and expiry at the database level are tests/jobs/test_batches.py."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from jobs.models import Job
from sqlalchemy import func, select

from .conftest import GENERATE_JSONL, ApiHelper

DAY = 24 * 3600


def request_line(custom_id: str, model: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": f"Prompt {custom_id}", **body}}


def batch_file(helper: ApiHelper, headers, model: str, lines: list[dict] | None = None) -> dict:
    lines = lines if lines is not None else [request_line("r1", model, max_tokens=8), request_line("r2", model)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return helper.upload_file(headers, content, "requests.jsonl", "batch")


def create(helper: ApiHelper, headers, **body):
    return helper.client.post("/v1/batches", json={"endpoint": "/v1/completions", "completion_window": "24h", **body},
                              headers=headers)


def created(helper: ApiHelper, headers, **body) -> dict:
    response = create(helper, headers, **body)
    assert response.status_code == 200, response.json
    return response.json


def jobs_of(helper: ApiHelper, headers) -> int:
    owner = helper.owner_of(headers)
    with helper.session() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner))


# Files


def test_file_objects_carry_openai_s_status_fields_and_new_purposes(helper, auth):
    model = helper.create_model(auth)
    batch = batch_file(helper, auth, model)
    assert batch["purpose"] == "batch" and batch["records"] == 2 and batch["tokens"] is None
    assert batch["status"] == "processed" and batch["status_details"] is None
    tune = helper.upload_file(auth, b'{"prompt": "Q:", "completion": " A"}\n', "tune.jsonl", "fine-tune")
    assert tune["purpose"] == "fine-tune" and tune["records"] == 1 and tune["tokens"] == 4  # read as a train file
    assert helper.client.get(f"/v1/files/{tune['id']}", headers=auth).json == tune

    response = helper.upload(auth, b'{"custom_id": "a"}\n', "out.jsonl", "batch_output")
    assert response.status_code == 400 and response.json["error"]["param"] == "purpose"
    assert "the platform writes" in response.json["error"]["message"]
    response = helper.upload(auth, b"[1]\n", "bad.jsonl", "batch")  # unreadable as batch input
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_file"
    assert "bad.jsonl: line 1: expected a JSON object" in response.json["error"]["message"]

    for purpose, expected in (("batch", [batch]), ("fine-tune", [tune]), ("batch_output", [])):
        listed = helper.client.get(f"/v1/files?purpose={purpose}", headers=auth)
        assert listed.status_code == 200 and listed.json["data"] == expected


def test_files_list_in_either_order_with_cursors(helper, auth):
    ids = [helper.upload_file(auth, filename=f"f{i}.txt")["id"] for i in range(3)]
    newest = [page["data"] for page in helper.walk("/v1/files", auth, limit=2)]
    assert [f["id"] for page in newest for f in page] == ids[::-1]
    oldest = [page["data"] for page in helper.walk("/v1/files", auth, limit=2, order="asc")]
    assert [f["id"] for page in oldest for f in page] == ids
    assert [f["id"] for f in helper.client.get("/v1/files?order=desc", headers=auth).json["data"]] == ids[::-1]
    response = helper.client.get("/v1/files?order=newest", headers=auth)
    assert response.status_code == 400 and response.json["error"]["param"] == "order"


# Creating batches


def test_a_valid_batch_is_validating_with_a_queued_generate_job(helper, auth):
    model = helper.create_model(auth)
    file = batch_file(helper, auth, model, [request_line("r1", model, max_tokens=8, temperature=0.5, stop="\n"),
                                            request_line("r2", model)])
    batch = created(helper, auth, input_file_id=file["id"], metadata={"team": "search"})
    assert batch["id"].startswith("batch_") and len(batch["id"]) == 30 and batch["object"] == "batch"
    assert (batch["status"], batch["endpoint"], batch["input_file_id"], batch["model"]) == (
        "validating", "/v1/completions", file["id"], model)
    assert batch["expires_at"] == batch["created_at"] + DAY and batch["metadata"] == {"team": "search"}
    assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert batch["usage"]["total_tokens"] == 0 and batch["errors"] is None
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert all(batch[f] is None for f in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                          "expired_at", "cancelling_at", "cancelled_at"))
    job = helper.client.get(f"/v1/jobs/{batch['job_id']}", headers=auth).json
    assert (job["type"], job["status"], job["model"], job["input_file"]) == ("generate", "queued", model, file["id"])
    assert job["sampling"]["max_new_tokens"] == 16 and job["metadata"] == {"team": "search"}
    assert [(m["args"], m["queue"]) for m in helper.broker_messages()] == [([job["id"]], "generate")]
    assert helper.client.get(f"/v1/batches/{batch['id']}", headers=auth).json == batch

    helper.set_status(job["id"], "running")
    assert helper.client.get(f"/v1/batches/{batch['id']}", headers=auth).json["status"] == "in_progress"
    window = created(helper, auth, input_file_id=file["id"], completion_window="168h")
    assert window["expires_at"] == window["created_at"] + 7 * DAY


def test_a_batch_with_bad_requests_is_failed_listing_every_problem_and_runs_nothing(helper, auth):
    model = helper.create_model(auth)
    lines = [request_line("ok", model),
             {**request_line("get", model), "method": "GET"},
             request_line("echo", model, echo=True, best_of=2),
             request_line("ids", model, prompt=[1, 2, 3]),
             request_line("long", model, max_tokens=1024),
             request_line("other", "model-ffffffffffffffffffffffff")]
    file = batch_file(helper, auth, model, lines)
    batch = created(helper, auth, input_file_id=file["id"])
    assert batch["status"] == "failed" and batch["failed_at"] == batch["created_at"] and batch["job_id"] is None
    errors = batch["errors"]["data"]
    assert batch["errors"]["object"] == "list"
    assert [(e["line"], e["param"], e["code"]) for e in errors] == [
        (2, "method", "invalid_method"),
        (3, "body.echo", "unsupported_parameter"),
        (3, "body.best_of", "unsupported_parameter"),
        (4, "body.prompt", "unsupported_parameter"),
        (5, "body.max_tokens", "invalid_value"),
        (6, "body.model", "mismatched_model"),
    ]
    assert "context of 1024 tokens" in errors[4]["message"]
    assert batch["request_counts"] == {"total": 6, "completed": 0, "failed": 0}
    assert jobs_of(helper, auth) == 0 and helper.broker_messages() == []
    response = helper.client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert response.status_code == 409 and "already finished (failed)" in response.json["error"]["message"]


def test_the_model_must_be_a_registered_model_of_the_caller_s(helper, auth, other_auth):
    others = helper.create_model(other_auth)
    file = batch_file(helper, auth, others)
    batch = created(helper, auth, input_file_id=file["id"])
    assert batch["status"] == "failed" and batch["model"] == others
    assert [(e["line"], e["param"], e["code"]) for e in batch["errors"]["data"]] == [(1, "body.model", "model_not_found")]
    unknown = batch_file(helper, auth, "gpt-3.5-turbo-instruct")
    assert created(helper, auth, input_file_id=unknown["id"])["errors"]["data"][0]["code"] == "model_not_found"
    assert jobs_of(helper, auth) == 0


@pytest.mark.parametrize("body, status, param", [
    ({"endpoint": "/v1/chat/completions"}, 422, "endpoint"),
    ({"endpoint": None}, 422, "endpoint"),
    ({"completion_window": "0h"}, 422, "completion_window"),
    ({"completion_window": "169h"}, 422, "completion_window"),
    ({"completion_window": "1d"}, 422, "completion_window"),
    ({"completion_window": "024h"}, 422, "completion_window"),
    ({"completion_window": 24}, 422, "completion_window"),
    ({"metadata": {"k": "v" * 513}}, 422, "metadata.k"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": 3600}}, 422, "output_expires_after"),
    ({"input_file_id": "file-000000000000000000000000"}, 400, "input_file_id"),
])
def test_bad_requests_name_the_field(helper, auth, body, status, param):
    model = helper.create_model(auth)
    file = batch_file(helper, auth, model)
    response = create(helper, auth, **{"input_file_id": file["id"], **body})
    assert response.status_code == status, response.json
    assert response.json["error"]["param"] == param
    if param == "endpoint":
        assert "/v1/completions" in response.json["error"]["message"]
    if param == "completion_window":
        assert '"1h" to "168h"' in response.json["error"]["message"]
    assert jobs_of(helper, auth) == 0


def test_the_input_file_must_be_the_caller_s_batch_file(helper, auth, other_auth):
    model = helper.create_model(auth)
    others = batch_file(helper, other_auth, helper.create_model(other_auth))
    response = create(helper, auth, input_file_id=others["id"])  # as for a missing file: a reference to nothing
    assert response.status_code == 400 and response.json["error"]["param"] == "input_file_id"
    assert response.json["error"]["code"] == "invalid_input"
    generate = helper.generation_file(auth, GENERATE_JSONL)
    response = create(helper, auth, input_file_id=generate["id"])
    assert response.status_code == 400 and response.json["error"]["param"] == "input_file_id"
    assert "purpose 'batch'" in response.json["error"]["message"]
    assert created(helper, auth, input_file_id=batch_file(helper, auth, model)["id"])["status"] == "validating"


# Reading and cancelling


def test_list_is_newest_first_paged_and_private(helper, auth, other_auth):
    model = helper.create_model(auth)
    file = batch_file(helper, auth, model)
    ids = [created(helper, auth, input_file_id=file["id"])["id"] for _ in range(3)]
    pages = helper.walk("/v1/batches", auth, limit=2)
    assert [b["id"] for page in pages for b in page["data"]] == ids[::-1] and len(pages) == 2
    assert helper.client.get("/v1/batches", headers=other_auth).json["data"] == []
    for url, method in ((f"/v1/batches/{ids[0]}", "GET"), (f"/v1/batches/{ids[0]}/cancel", "POST")):
        response = helper.client.open(url, method=method, headers=other_auth)
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found"
    response = helper.client.get(f"/v1/batches?after={ids[0]}", headers=other_auth)
    assert response.status_code == 400 and response.json["error"]["param"] == "after"
    assert helper.client.get("/v1/batches?limit=0", headers=auth).status_code == 400
    assert helper.client.get(f"/v1/batches/{ids[0]}", headers=auth).json["status"] == "validating"


def test_cancelling_a_queued_batch_cancels_it_at_once_with_every_request_in_the_error_file(helper, auth):
    model = helper.create_model(auth)
    batch = created(helper, auth, input_file_id=batch_file(helper, auth, model)["id"])
    response = helper.client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert response.status_code == 200, response.json
    cancelled = response.json
    assert cancelled["status"] == "cancelled" and cancelled["cancelling_at"] is not None
    assert cancelled["cancelled_at"] is not None and cancelled["finalizing_at"] is None  # as OpenAI's
    assert cancelled["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    assert cancelled["output_file_id"] is None  # nothing completed: no empty file, as OpenAI does
    error_file = helper.client.get(f"/v1/files/{cancelled['error_file_id']}", headers=auth).json
    assert error_file["purpose"] == "batch_output" and error_file["records"] == 2
    assert error_file["filename"] == f"{batch['id']}_error.jsonl"
    lines = [json.loads(line) for line in
             helper.client.get(f"/v1/files/{error_file['id']}/content", headers=auth).data.splitlines()]
    assert [(line["custom_id"], line["response"], line["error"]["code"]) for line in lines] == [
        ("r1", None, "batch_cancelled"), ("r2", None, "batch_cancelled")]
    assert helper.client.get(f"/v1/jobs/{batch['job_id']}", headers=auth).json["status"] == "cancelled"
    again = helper.client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert again.status_code == 409 and "already finished (cancelled)" in again.json["error"]["message"]


def test_cancelling_a_running_batch_waits_for_its_worker(helper, auth):
    model = helper.create_model(auth)
    batch = created(helper, auth, input_file_id=batch_file(helper, auth, model)["id"])
    helper.set_status(batch["job_id"], "running")
    cancelling = helper.client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth).json
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
    assert cancelling["in_progress_at"] is not None and cancelling["cancelled_at"] is None
    assert helper.client.get(f"/v1/jobs/{batch['job_id']}", headers=auth).json["status"] == "cancelling"
    assert helper.client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth).json["status"] == "cancelling"
    helper.set_status(batch["job_id"], "cancelled")  # the worker stopped; the finalization has not run yet
    stopped = helper.client.get(f"/v1/batches/{batch['id']}", headers=auth).json
    assert stopped["status"] == "cancelling" and stopped["finalizing_at"] is None  # cancelling, then cancelled
    # cancelling it again finds its job ended: the API writes its files, and it is cancelled
    assert helper.client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth).json["status"] == "cancelled"


# The openai SDK, unmodified, against the app


@pytest.fixture
def served(app) -> Iterator[str]:
    """The app served over HTTP on a free local port (werkzeug, threaded), for the SDK."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    thread.join()


def test_the_openai_sdk_drives_files_and_batches(helper, auth, served, tmp_path):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=served, api_key=auth["Authorization"].split(" ", 1)[1], max_retries=0)
    model = helper.create_model(auth)
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(request_line(f"r{i}", model, max_tokens=4)) + "\n" for i in range(3)))
    with path.open("rb") as stream:
        uploaded = client.files.create(file=stream, purpose="batch")
    assert (uploaded.purpose, uploaded.status, uploaded.filename, uploaded.bytes) == (
        "batch", "processed", "requests.jsonl", path.stat().st_size)
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).read() == path.read_bytes()
    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]
    assert [f.id for f in client.files.list(order="asc", limit=1)] == [uploaded.id]

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"run": "sdk"})
    assert (batch.status, batch.model, batch.metadata, batch.request_counts.total) == (
        "validating", model, {"run": "sdk"}, 3)
    assert client.batches.retrieve(batch.id).status == "validating"
    second = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert [b.id for b in client.batches.list(limit=1)] == [second.id, batch.id]  # the SDK follows `after`

    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.output_file_id is None
    lines = client.files.content(cancelled.error_file_id).read().decode().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == ["r0", "r1", "r2"]
    with pytest.raises(openai.ConflictError) as conflict:
        client.batches.cancel(batch.id)
    assert conflict.value.status_code == 409
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_000000000000000000000000")
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.body["param"] == "endpoint"

    assert client.files.delete(cancelled.error_file_id).deleted
    assert client.batches.retrieve(batch.id).error_file_id is None
