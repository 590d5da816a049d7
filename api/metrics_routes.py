"""/v1/jobs/{id}/metrics: a train or finetune job's per-step training metrics (jobs.training_metrics), as JSON
for charts (a live chart asks for what is new with `after`, the last step it has) and as a CSV file."""
from __future__ import annotations

import csv
import io
from typing import Any, Iterator

from flask import Response, request

from jobs import repository
from jobs.db import session_scope
from jobs.models import JobMetric
from jobs.repository import MAX_METRICS_PAGE_SIZE
from jobs.training_metrics import VALUE_COLUMNS

from .errors import ApiError
from .context import MAX_INT_CURSOR, owner, platform, query_integer, unit_of_work, v1_blueprint

job_metrics = v1_blueprint("job_metrics")
#: The CSV file's header row: the JSON object's keys, in the same order.
CSV_COLUMNS = ("step", *VALUE_COLUMNS)


def metric_object(row: JobMetric) -> dict[str, Any]:
    """One step: its number, train_loss and val_loss (nats per token; val_loss null except on evaluation steps),
    learning_rate, grad_norm (before clipping), tokens_per_second and elapsed_seconds (since the job first
    started). A value that was not finite is null."""
    return {name: getattr(row, name) for name in CSV_COLUMNS}


def metric_paging() -> dict[str, Any]:
    """`after` (a step) and `limit` from the query string, with the bounds the OpenAPI document states."""
    after = request.args.get("after")
    limit = request.args.get("limit")
    return {"after": None if after is None else query_integer("after", after, 0, MAX_INT_CURSOR),
            "limit": MAX_METRICS_PAGE_SIZE if limit is None else query_integer("limit", limit, 1, MAX_METRICS_PAGE_SIZE)}


@job_metrics.get("/jobs/<job_id>/metrics")
def list_metrics(job_id: str):
    """A train or finetune job's per-step metrics by step (`after` a step, `limit`)."""
    with unit_of_work() as session:
        rows, has_more = repository.list_job_metrics(session, owner(), job_id, **metric_paging())
        return {"object": "list", "data": [metric_object(row) for row in rows], "has_more": has_more}


@job_metrics.get("/jobs/<job_id>/metrics.csv")
def metrics_csv(job_id: str):
    """A train or finetune job's per-step metrics as a CSV file with a header row, streamed (`after` a step)."""
    caller, sessions = owner(), platform().sessions
    start = request.args.get("after")
    if "limit" in request.args:
        raise ApiError(400, "invalid_request", "metrics.csv is every step (after `after`); page with /metrics "
                       "for `limit`", "limit")
    after_step = None if start is None else query_integer("after", start, 0, MAX_INT_CURSOR)
    with unit_of_work() as session:  # a missing job (404) or a generate job (400) before the file starts
        repository.list_job_metrics(session, caller, job_id, limit=1)

    def lines() -> Iterator[str]:
        # Runs after the view has returned, outside the app context: only what was captured above.
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        after = after_step
        while True:
            with session_scope(sessions) as session:
                rows, has_more = repository.list_job_metrics(session, caller, job_id, after=after)
                values = [[getattr(row, name) for name in CSV_COLUMNS] for row in rows]
            writer.writerows(values)  # None is written as an empty cell
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if not has_more or not values:
                return
            after = values[-1][0]

    return Response(lines(), content_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f"attachment; filename={job_id}-metrics.csv"})
