"""GET /metrics: the platform in the Prometheus text format, and the timing of every HTTP request the API serves.

Two kinds of series:

* Job series, read from the database at each scrape (jobs.stats) by JobStatsCollector: `gpt2jobs_jobs{type,
  status}` (gauge), `gpt2jobs_job_queue_wait_seconds{type}` and `gpt2jobs_job_duration_seconds{type,status}`
  (histograms), `gpt2jobs_tokens_total{kind}` (kind `trained` or `generated`) and
  `gpt2jobs_lease_takeovers_total` (counters). Workers run on other hosts, so the database is the one place
  that sees them all: one scrape of any API process gives the whole cluster, and restarts lose nothing.
  `gpt2jobs_database_up` is 0 when the database could not be read (the job series are then left out; the HTTP
  series are still served).
* `gpt2jobs_http_request_duration_seconds{method,route,status}` (histogram): seconds from the start of a request
  to its response (a streamed body's time is not included), observed in the process that served it. `route` is
  the matched URL rule (`/v1/jobs/<job_id>`), never the raw path, so its values are bounded; a request no route
  matches is `<unmatched>`, a method outside HTTP's usual ones `OTHER`. Under gunicorn, gunicorn.conf.py sets
  PROMETHEUS_MULTIPROC_DIR before the workers start, and prometheus_client's multiprocess mode adds up every
  worker process's observations at each scrape; without it (the Flask test client, `flask run`), the app keeps
  its own histogram.

Access: no key by default (as Prometheus expects); with the METRICS_TOKEN setting, `Authorization: Bearer
<METRICS_TOKEN>` is required (README, "Monitoring").
"""
from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from jobs.stats import Histogram as Observed
from jobs.stats import JobStats, job_stats

from .context import platform, unit_of_work
from .errors import ApiError

monitoring = Blueprint("monitoring", __name__)
log = logging.getLogger("api")

#: The text format version 0.0.4, which every Prometheus reads (the series names need no escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "<unmatched>"
HTTP_HISTOGRAM = "gpt2jobs.http_histogram"


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes its values to PROMETHEUS_MULTIPROC_DIR (decided when it was imported)."""
    return values.ValueClass is not values.MutexValue


def register_monitoring(app: Flask) -> None:
    """Time every request of `app` and serve /metrics."""
    app.extensions[HTTP_HISTOGRAM] = Histogram(
        "gpt2jobs_http_request_duration_seconds", "Seconds from the start of an HTTP request to its response, by "
        "method, route (the URL rule) and status.", ["method", "route", "status"], registry=None)
    app.before_request(start_timer)
    app.after_request(observe_request)
    app.register_blueprint(monitoring)


def start_timer() -> None:
    g.request_started = time.perf_counter()


def observe_request(response: Response) -> Response:
    started = g.pop("request_started", None)
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
        method = request.method if request.method in HTTP_METHODS else "OTHER"
        current_app.extensions[HTTP_HISTOGRAM].labels(method, route, str(response.status_code)).observe(
            time.perf_counter() - started)
    return response


def check_metrics_token() -> None:
    """With METRICS_TOKEN set, 401 unless the request carries it as a bearer token."""
    token = platform().settings.metrics_token
    if token is None:
        return
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if not scheme:
        raise ApiError(401, "missing_api_key", "Send the metrics token as 'Authorization: Bearer <METRICS_TOKEN>'.")
    if scheme.lower() != "bearer" or not hmac.compare_digest(secret.strip().encode(), token.encode()):
        raise ApiError(401, "invalid_api_key", "The metrics token is not valid.")


def histogram_buckets(observed: Observed) -> list[tuple[str, float]]:
    """HistogramMetricFamily's buckets: (upper bound as Prometheus writes it, cumulative count), +Inf last."""
    return [(floatToGoString(bound), float(count)) for bound, count in observed.buckets] + [("+Inf", float(observed.count))]


class JobStatsCollector(Collector):
    """The job series of one scrape, from the statistics read for it (None: the database could not be read)."""

    def __init__(self, stats: JobStats | None):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("gpt2jobs_database_up", "1 when this scrape could read the database, else 0.")
        up.add_metric([], 0 if self.stats is None else 1)
        yield up
        stats = self.stats
        if stats is None:
            return
        jobs = GaugeMetricFamily("gpt2jobs_jobs", "Jobs in the database, by type and status.", labels=["type", "status"])
        for (type_, status), count in sorted(stats.jobs.items()):
            jobs.add_metric([type_, status], count)
        yield jobs
        wait = HistogramMetricFamily("gpt2jobs_job_queue_wait_seconds", "Seconds from a job's submission to its "
                                     "first start, of every job that started, by type.", labels=["type"])
        for type_, observed in sorted(stats.queue_wait.items()):
            wait.add_metric([type_], histogram_buckets(observed), sum_value=observed.sum)
        yield wait
        duration = HistogramMetricFamily("gpt2jobs_job_duration_seconds", "Seconds from a job's first start to its "
                                         "end, of every finished job that started, by type and final status.",
                                         labels=["type", "status"])
        for (type_, status), observed in sorted(stats.duration.items()):
            duration.add_metric([type_, status], histogram_buckets(observed), sum_value=observed.sum)
        yield duration
        tokens = CounterMetricFamily("gpt2jobs_tokens", "Tokens trained on (train and finetune jobs) and generated "
                                     "(completion tokens of generation results).", labels=["kind"])
        tokens.add_metric(["trained"], stats.tokens_trained)
        tokens.add_metric(["generated"], stats.tokens_generated)
        yield tokens
        takeovers = CounterMetricFamily("gpt2jobs_lease_takeovers", "Times a job's worker stopped renewing its "
                                        "lease and the job was taken back for another worker.")
        takeovers.add_metric([], stats.lease_takeovers)
        yield takeovers


def read_job_stats() -> JobStats | None:
    try:
        with unit_of_work() as session:
            return job_stats(session)
    except (OperationalError, InterfaceError, PoolTimeout) as exc:
        log.warning("metrics: the database could not be read: %s", exc)
        return None


@monitoring.get("/metrics")
def metrics():
    """Metrics in the Prometheus text format: jobs (from the database) and HTTP requests (every API process)."""
    check_metrics_token()
    registry = CollectorRegistry()
    if multiprocess_mode():
        MultiProcessCollector(registry)
    else:
        registry.register(current_app.extensions[HTTP_HISTOGRAM])
    registry.register(JobStatsCollector(read_job_stats()))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE)
