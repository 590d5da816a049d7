"""GET /v1/jobs/{id}/metrics and /metrics.csv: a training job's per-step metrics as JSON (with `after` for a live
chart) and as a CSV file, on SQLite and PostgreSQL; another owner's job is 404, a generate job 400."""
from __future__ import annotations

import csv
import io
import math

from jobs.training_metrics import upsert_metrics

FIELDS = ["step", "train_loss", "val_loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds"]


def test_metrics_come_back_by_step_with_exactly_the_contract_s_fields(helper, auth):
    job = helper.train_job(auth)["id"]
    rows = helper.add_metrics(job, [3, 1, 2, 4])
    response = helper.client.get(f"/v1/jobs/{job}/metrics", headers=auth)
    assert response.status_code == 200, response.json
    body = response.json
    assert set(body) == {"object", "data", "has_more"} and body["object"] == "list" and body["has_more"] is False
    assert all(set(point) == set(FIELDS) for point in body["data"])  # (the API sorts every object's keys)
    assert body["data"] == sorted(rows, key=lambda row: row["step"])
    assert body["data"][0]["val_loss"] is None and body["data"][2]["val_loss"] == 3.0


def test_after_gives_only_the_steps_a_chart_does_not_have_yet(helper, auth):
    job = helper.train_job(auth)["id"]
    helper.add_metrics(job, range(1, 8))
    get = lambda **query: helper.client.get(f"/v1/jobs/{job}/metrics", query_string=query, headers=auth)  # noqa: E731
    assert [p["step"] for p in get(after=4).json["data"]] == [5, 6, 7]
    assert get(after=7).json == {"object": "list", "data": [], "has_more": False}
    page = get(after=1, limit=2).json
    assert [p["step"] for p in page["data"]] == [2, 3] and page["has_more"] is True
    for query, param in (({"after": "x"}, "after"), ({"after": "-1"}, "after"), ({"limit": "0"}, "limit"),
                         ({"limit": "10001"}, "limit")):
        response = get(**query)
        assert response.status_code == 400 and response.json["error"]["param"] == param, response.json


def test_an_evaluation_rewrites_only_its_val_loss_and_a_resumed_run_rewrites_whole_rows(helper, auth):
    job = helper.train_job(auth)["id"]
    helper.add_metrics(job, [1, 2])
    with helper.session() as session:
        upsert_metrics(session, job, [{"step": 2, "val_loss": 7.5}])
        upsert_metrics(session, job, [{"step": 1, "train_loss": 4.0, "val_loss": None, "learning_rate": 1e-3,
                                       "grad_norm": math.inf, "tokens_per_second": 100.0, "elapsed_seconds": 9.0}])
    first, second = helper.client.get(f"/v1/jobs/{job}/metrics", headers=auth).json["data"]
    assert first == {"step": 1, "train_loss": 4.0, "val_loss": None, "learning_rate": 1e-3, "grad_norm": None,
                     "tokens_per_second": 100.0, "elapsed_seconds": 9.0}
    assert second["val_loss"] == 7.5 and second["train_loss"] == 5.0


def test_csv_has_a_header_row_and_empty_cells_for_null(helper, auth):
    job = helper.train_job(auth)["id"]
    rows = helper.add_metrics(job, range(1, 5))
    response = helper.client.get(f"/v1/jobs/{job}/metrics.csv", headers=auth)
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == f"attachment; filename={job}-metrics.csv"
    table = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert table[0] == FIELDS and len(table) == 5
    for line, row in zip(table[1:], rows):
        assert line == ["" if row[name] is None else repr(row[name]) for name in FIELDS]
        assert float(line[1]) == row["train_loss"]  # the exact float, not a rounding of it


def test_csv_after_a_step_and_no_limit(helper, auth):
    job = helper.train_job(auth)["id"]
    helper.add_metrics(job, range(1, 7))
    response = helper.client.get(f"/v1/jobs/{job}/metrics.csv?after=4", headers=auth)
    table = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert table[0] == FIELDS and [line[0] for line in table[1:]] == ["5", "6"]
    for query, param in (("after=-1", "after"), ("after=x", "after"), ("limit=2", "limit")):
        refused = helper.client.get(f"/v1/jobs/{job}/metrics.csv?{query}", headers=auth)
        assert refused.status_code == 400 and refused.json["error"]["param"] == param, query


def test_csv_of_a_job_without_metrics_is_its_header(helper, auth):
    job = helper.train_job(auth)["id"]
    response = helper.client.get(f"/v1/jobs/{job}/metrics.csv", headers=auth)
    assert response.get_data(as_text=True) == ",".join(FIELDS) + "\n"
    assert helper.client.get(f"/v1/jobs/{job}/metrics", headers=auth).json["data"] == []


def test_another_owner_s_or_a_missing_job_is_404(helper, auth, other_auth):
    job = helper.train_job(auth)["id"]
    helper.add_metrics(job, [1])
    for path in (f"/v1/jobs/{job}/metrics", f"/v1/jobs/{job}/metrics.csv", "/v1/jobs/job-nothing/metrics",
                 "/v1/jobs/job-nothing/metrics.csv"):
        headers = other_auth if job in path else auth
        response = helper.client.get(path, headers=headers)
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found", path


def test_a_generate_job_has_no_training_metrics(helper, auth):
    job = helper.generate_job(auth)["id"]
    for path in (f"/v1/jobs/{job}/metrics", f"/v1/jobs/{job}/metrics.csv"):
        response = helper.client.get(path, headers=auth)
        assert response.status_code == 400, response.json
        assert response.json["error"] == {"code": "invalid_request", "param": "job_id",
                                          "message": "generate jobs have no training metrics"}
