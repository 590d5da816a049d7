"""GET /metrics (Prometheus), in-process on SQLite and PostgreSQL: the job series equal what the database holds,
the HTTP histogram labels requests by their route pattern, METRICS_TOKEN guards it, and a database that cannot
be reached leaves the HTTP series served. (Several gunicorn processes: tests/e2e/test_metrics_process.py.)"""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import func, select, update

from jobs.models import GenerationResult, Job
from jobs.stats import DURATION_BUCKETS, QUEUE_WAIT_BUCKETS

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def scrape(client, headers: dict[str, str] | None = None) -> dict[str, list[Sample]]:
    """The samples of /metrics by family name (a counter's family drops `_total`)."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200 and response.mimetype == "text/plain", response.get_data()[:300]
    return {family.name: family.samples for family in text_string_to_metric_families(response.get_data(as_text=True))}


def by_labels(samples: list[Sample], suffix: str, *names: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels[n] for n in names): s.value for s in samples if s.name.endswith(suffix)}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def jobs_in_every_state(helper, auth) -> list[str]:
    """Jobs queued, running, cancelling, succeeded, failed and cancelled (one before it started), with known
    times, a lost worker, trained tokens and generation results."""
    queued = helper.train_job(auth)["id"]
    running, cancelling, succeeded = (helper.train_job(auth)["id"] for _ in range(3))
    failed, cancelled = helper.generate_job(auth)["id"], helper.generate_job(auth)["id"]
    helper.set_status(running, "running")
    helper.set_status(cancelling, "running", "cancelling")
    helper.set_status(succeeded, "running", "succeeded")
    helper.set_status(failed, "running", "failed")
    helper.set_status(cancelled, "cancelled")
    helper.add_results(failed, [0, 1])
    with helper.session() as session:
        for job_id, wait, ran in ((running, 3, None), (cancelling, 40, None), (succeeded, 0.5, 4000), (failed, 700, 30)):
            values = {"created_at": at(0), "started_at": at(wait)}
            if ran is not None:
                values["finished_at"] = at(wait + ran)
            session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.execute(update(Job).where(Job.id == running).values(workers_lost=2, progress={"step": 10, "tokens": 5120}))
        session.execute(update(Job).where(Job.id == succeeded).values(progress={"step": 20, "tokens": 10240}))
    return [queued, running, cancelling, succeeded, failed, cancelled]


def expected_histogram(seconds: list[float], bounds: tuple[float, ...]) -> tuple[dict[str, float], float]:
    buckets = {repr(bound): float(sum(1 for s in seconds if s <= bound)) for bound in bounds}
    buckets["+Inf"] = float(len(seconds))
    return buckets, sum(seconds)


def check_histogram(samples: list[Sample], labels: dict[str, str], seconds: list[float], bounds) -> None:
    mine = [s for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    buckets = {s.labels["le"]: s.value for s in mine if s.name.endswith("_bucket")}
    values = [buckets[repr(bound)] for bound in bounds] + [buckets["+Inf"]]
    assert values == sorted(values), f"{labels}: buckets are not cumulative: {values}"
    want, total = expected_histogram(seconds, bounds)
    assert buckets == want, labels
    (count,) = [s.value for s in mine if s.name.endswith("_count")]
    (summed,) = [s.value for s in mine if s.name.endswith("_sum")]
    # SQLite's date functions resolve milliseconds: each observation may be off by up to 1 ms there.
    assert count == len(seconds) and math.isclose(summed, total, rel_tol=1e-6, abs_tol=1e-3 * max(count, 1)), labels


def test_job_series_equal_what_the_database_holds(helper, jobs_in_every_state):
    families = scrape(helper.client)
    with helper.session() as session:
        counted = {(t, s): n for t, s, n in session.execute(
            select(Job.type, Job.status, func.count()).group_by(Job.type, Job.status))}
        jobs = session.execute(select(Job.type, Job.status, Job.created_at, Job.started_at, Job.finished_at,
                                      Job.progress, Job.workers_lost)).all()
        usages = session.scalars(select(GenerationResult.usage)).all()
    gauge = by_labels(families["gpt2jobs_jobs"], "gpt2jobs_jobs", "type", "status")
    assert {key: value for key, value in gauge.items() if value} == {key: float(n) for key, n in counted.items()}
    assert len(gauge) == 3 * 8  # every type and status, 0 where there is none
    assert families["gpt2jobs_database_up"][0].value == 1.0

    started = [j for j in jobs if j.started_at is not None]
    for type_ in ("train", "finetune", "generate"):
        waits = [max(0.0, (j.started_at - j.created_at).total_seconds()) for j in started if j.type == type_]
        check_histogram(families["gpt2jobs_job_queue_wait_seconds"], {"type": type_}, waits, QUEUE_WAIT_BUCKETS)
    waits = by_labels(families["gpt2jobs_job_queue_wait_seconds"], "_count", "type")
    assert sum(waits.values()) == len(started)  # _count: every job that started
    for type_, status in (("train", "succeeded"), ("generate", "failed"), ("train", "cancelled")):
        ran = [(j.finished_at - j.started_at).total_seconds() for j in started
               if (j.type, j.status) == (type_, status) and j.finished_at is not None]
        check_histogram(families["gpt2jobs_job_duration_seconds"], {"type": type_, "status": status}, ran,
                        DURATION_BUCKETS)

    tokens = by_labels(families["gpt2jobs_tokens"], "_total", "kind")
    assert tokens[("trained",)] == sum((j.progress or {}).get("tokens", 0) for j in jobs if j.type != "generate")
    assert tokens[("generated",)] == sum(usage.get("completion_tokens", 0) for usage in usages)
    assert tokens[("trained",)] >= 5120 + 10240 and tokens[("generated",)] >= 6
    (takeovers,) = families["gpt2jobs_lease_takeovers"]
    assert takeovers.name == "gpt2jobs_lease_takeovers_total" and takeovers.value == sum(j.workers_lost for j in jobs)


def test_the_http_histogram_labels_requests_by_route_pattern(helper, auth, jobs_in_every_state):
    job_id = jobs_in_every_state[0]
    assert helper.client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    assert helper.client.get("/v1/jobs/job-missing", headers=auth).status_code == 404
    assert helper.client.get(f"/no/such/{job_id}").status_code == 404
    assert helper.client.open("/healthz", method="BREW").status_code == 405
    samples = scrape(helper.client)["gpt2jobs_http_request_duration_seconds"]
    counts = by_labels(samples, "_count", "method", "route", "status")
    assert counts[("GET", "/v1/jobs/<job_id>", "200")] == 1 and counts[("GET", "/v1/jobs/<job_id>", "404")] == 1
    assert counts[("GET", "<unmatched>", "404")] == 1 and counts[("OTHER", "<unmatched>", "405")] == 1
    assert not any(job_id in route for _, route, _ in counts)  # never the raw path
    buckets = [s.value for s in samples if s.name.endswith("_bucket") and s.labels["status"] == "200"
               and s.labels["route"] == "/v1/jobs/<job_id>"]
    assert buckets == sorted(buckets) and buckets[-1] == 1
    # The scrape itself is counted by the next one.
    again = by_labels(scrape(helper.client)["gpt2jobs_http_request_duration_seconds"], "_count", "route")
    assert again[("/metrics",)] == 1


def test_metrics_token_is_required_when_set(make_app):
    client = make_app(METRICS_TOKEN="s3cret-token").test_client()
    for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
                          ({"Authorization": "Basic s3cret-token"}, "invalid_api_key")):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401 and response.json["error"]["code"] == code, response.json
    assert "gpt2jobs_jobs" in scrape(client, {"Authorization": "Bearer s3cret-token"})


def test_an_unreachable_database_leaves_the_http_series(offline_database_app):
    client = offline_database_app.test_client()
    client.get("/healthz")
    families = scrape(client)
    assert families["gpt2jobs_database_up"][0].value == 0.0
    assert "gpt2jobs_jobs" not in families and "gpt2jobs_http_request_duration_seconds" in families
