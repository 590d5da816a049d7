"""OpenAI batches over our generate jobs: create, read, cancel, expire and finalize them.

A batch is a file of OpenAI /v1/completions requests (purpose "batch", read by jobs.openai_batch) run as one of
our generate jobs: the same workers, shards, per-item seeds (workers.generation.item_seed) and per-item errors as
any generate job. The batch row keeps what OpenAI's batch object shows and the job does not (endpoint, window,
expiry, cancel, the output files); everything else is read from the job.

* **Create** (:func:`create_batch`): the input file must be the caller's (else 404) with purpose "batch" (else 400).
  Every request is judged (jobs.openai_batch, plus the model: registered and the caller's, each max_tokens within
  its context). A batch with any problem is stored "failed" at once, listing every problem (line, param) in
  `errors`, and no job is made; else a generate job on the file is submitted (jobs.submission) and referenced.
* **Status** (:func:`batch_status`, pure): what finalization stored (completed, failed, expired, cancelled), or,
  before that, from the job: ended -> finalizing; the window passed and the job is being stopped -> finalizing;
  a cancel asked for (of the batch, or of its job) -> cancelling; queued and never started -> validating; else
  (running, pausing, paused, queued again after a lost worker) -> in_progress.
* **Finalize** (jobs.batch_output.finalize_batch): once the job has ended, the output file (a line per request that
  completed) and the error file (a line per request that failed, or did not run because the batch expired, was
  cancelled or failed) are written to the artifact store and recorded as files with purpose "batch_output" owned
  by the batch's owner (a file that would be empty is not made: its id stays null, as OpenAI does), and the
  outcome is stored. Once: the files are written first, then the outcome is stored under the batch's row lock
  only if no one stored it meanwhile (a loser removes its files), so two processes may try at once. Who tries:
  the worker that took part in the job, when its delivery ends (workers.generation.run_generation); the API, when
  a cancel ended the job at once; and every sweep of every worker (workers.sweeper -> sweep_batches), for
  jobs that ended any other way (a lost worker, a cancel through /v1/jobs) or whose worker died first.
* **Expire** (:func:`expire_batch`, from jobs.batch_output.sweep_batches): a batch still unfinished past `expires_at`
  (created_at + completion_window) has its job cancelled cooperatively (repository.cancel_job: shards being
  generated finish and are stored), `expired_at` set; finalization then writes what was done and a
  "batch_expired" error line for every request that did not run, and the batch is "expired".
* **Cancel** (:func:`cancel_batch`): the job is cancelled (repository.cancel_job); the batch is "cancelling" until
  finalization makes it "cancelled" (with the partial output kept, and "batch_cancelled" lines for the rest).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import Field, field_validator
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from jobs import repository
from jobs.db import session_scope
from jobs.errors import Conflict, InvalidInput, InvalidRequest, NotFound
from jobs.models import Batch, File, GenerationResult, Job, Model, unix_time, utcnow
from jobs.openai_batch import DEFAULT_MAX_TOKENS, SUPPORTED_ENDPOINTS, BatchInput, BatchProblem, read_batch_file
from jobs.repository import MAX_PAGE_SIZE
from jobs.specs import GenerateSpec, Metadata, ResourceId, Sampling, Strict
from jobs.states import CANCELLING, FAILED, QUEUED, SUCCEEDED, TERMINAL
from jobs.submission import model_context, submit_job

log = logging.getLogger("jobs.batches")

BATCH_PREFIX = "batch_"
#: A completion window: a whole number of hours, 1 to 168 (a week); OpenAI's is "24h".
MAX_WINDOW_HOURS = 168
WINDOW_PATTERN = r"^([1-9]|[1-9][0-9]|1[0-5][0-9]|16[0-8])h$"


def new_batch_id() -> str:
    """"batch_" and 24 random hex characters (96 bits), as OpenAI writes batch ids."""
    return BATCH_PREFIX + secrets.token_hex(12)


class BatchCreate(Strict):
    """The body of POST /v1/batches (what `client.batches.create(...)` sends)."""

    input_file_id: ResourceId = Field(description="A file of yours with purpose 'batch': one /v1/completions "
                                                  "request per line.")
    endpoint: str = Field(description="Where the requests go: only /v1/completions.",
                          json_schema_extra={"enum": list(SUPPORTED_ENDPOINTS)})
    completion_window: Annotated[str, Field(pattern=WINDOW_PATTERN)] = Field(
        description='How long the batch may take: "24h" (OpenAI\'s), or any whole number of hours from "1h" to '
                    f'"{MAX_WINDOW_HOURS}h". Requests not done by then are not run (batch_expired).')
    metadata: Metadata | None = None

    @field_validator("endpoint", mode="before")
    @classmethod
    def supported_endpoint(cls, value: Any) -> Any:
        if value not in SUPPORTED_ENDPOINTS:
            shown = json.dumps(value) if isinstance(value, str) else type(value).__name__
            raise ValueError(f"must be {' or '.join(SUPPORTED_ENDPOINTS)}, the only endpoint batches run here (GPT-2 "
                             f"completes text), got {shown}")
        return value

    @field_validator("completion_window", mode="before")
    @classmethod
    def whole_hours(cls, value: Any) -> Any:
        if not isinstance(value, str) or not re.fullmatch(WINDOW_PATTERN, value):
            shown = json.dumps(value) if isinstance(value, str) else type(value).__name__
            raise ValueError(f'must be a whole number of hours from "1h" to "{MAX_WINDOW_HOURS}h", such as "24h"; '
                             f"got {shown}")
        return value


def window_hours(window: str) -> int:
    return int(window.removesuffix("h"))


# Status


def batch_status(batch: Batch, job: Job | None) -> str:
    """The status OpenAI's batch object shows, from the batch row and its job (the only place it is decided)."""
    if batch.outcome is not None:
        return batch.outcome
    if batch.expired_at is not None:
        return "finalizing"  # its window passed: the job is stopping for good, then the output files are written
    if batch.cancelling_at is not None or (job is not None and job.status == CANCELLING):
        return "cancelling"  # until it is cancelled: OpenAI's cancel path has no finalizing
    if job is None or job.status in TERMINAL:
        return "finalizing"  # the job ended: the output files are being written
    if job.status == QUEUED and job.started_at is None:
        return "validating"
    return "in_progress"


def outcome_of(batch: Batch, job: Job | None) -> str:
    """What a batch whose job has ended ends as: completed when the job did every request; failed when the job
    failed (or is gone); expired when it was stopped because the window passed; cancelled otherwise."""
    if job is None or job.status == FAILED:
        return "failed"
    if job.status == SUCCEEDED:
        return "completed"
    return "expired" if batch.expired_at is not None else "cancelled"


# Create


def create_batch(sessions: sessionmaker[Session], owner: str, request: BatchCreate, *, max_inline_prompts: int,
                 now: datetime | None = None) -> tuple[Batch, Job | None]:
    """The stored batch and, for a valid one, its new queued generate job (enqueue it after this returns).
    InvalidInput (param input_file_id, 400, as for any reference in a body: jobs.repository) for an input file
    that is not the caller's; InvalidRequest (the same param, 400) for a file with another purpose. A batch whose
    requests have problems is returned failed, with no job."""
    now = now or utcnow()
    with session_scope(sessions) as session:
        file = session.scalars(select(File).where(File.id == request.input_file_id, File.owner == owner)).one_or_none()
        if file is None:
            raise no_such_file(request.input_file_id)
        if file.purpose != "batch":
            raise InvalidRequest(f"input_file_id: file {file.id!r} has purpose {file.purpose!r}; a batch needs a file "
                                 "uploaded with purpose 'batch'", param="input_file_id", status=400)
        path, filename = file.storage_path, file.filename
    # Read outside any transaction (the file is immutable; its row is locked again when the job is stored).
    try:
        with open(path, "rb") as stream:
            read = read_batch_file(stream, filename)
    except FileNotFoundError:
        raise no_such_file(request.input_file_id) from None

    batch = Batch(id=new_batch_id(), owner=owner, endpoint=request.endpoint, input_file_id=request.input_file_id,
                  completion_window=request.completion_window, model=read.model, metadata_=request.metadata,
                  created_at=now, expires_at=now + timedelta(hours=window_hours(request.completion_window)))
    with session_scope(sessions) as session:
        check_model(session, owner, read)
        job = None
        if read.problems:
            batch.outcome, batch.finished_at = "failed", now
            batch.errors = sorted(read.errors(), key=lambda e: (e["line"] is None, e["line"] or 0))
            batch.request_counts = {"total": len(read.requests), "completed": 0, "failed": 0}
        else:
            assert read.model is not None  # every request names it, or there is a problem
            # Each request sets its own max_new_tokens (jobs.openai_batch); the job shows the largest, which
            # check_model found within the model's context.
            longest = max((r.sampling.max_new_tokens for r in read.requests if r.sampling), default=DEFAULT_MAX_TOKENS)
            spec = GenerateSpec(type="generate", model=read.model, input_file=request.input_file_id,
                                sampling=Sampling(max_new_tokens=longest), metadata=request.metadata or {})
            try:
                job, _ = submit_job(session, owner, spec, max_inline_prompts=max_inline_prompts)
            except InvalidInput as exc:
                if exc.param == "input_file":  # deleted since it was read
                    raise no_such_file(request.input_file_id) from None
                raise
            batch.job_id = job.id
            repository.add_event(session, job.id, f"Runs batch {batch.id}: {len(read.requests)} requests to "
                                 f"{request.endpoint}, to be done within {request.completion_window}")
        session.add(batch)
        session.flush()
    return batch, job


def no_such_file(file_id: str) -> InvalidInput:
    return InvalidInput(f"No file with id {file_id!r}", param="input_file_id")


def check_model(session: Session, owner: str, read: BatchInput) -> None:
    """The problems only the database can tell: the requests' model is not a registered model of the caller's;
    a max_tokens leaves no room for a prompt in its context."""
    name = read.model
    if name is None:
        return
    model = session.scalars(select(Model).where(Model.id == name, Model.owner == owner)).one_or_none()
    first = next(r for r in read.requests if r.model == name)
    if model is None:
        read.report(BatchProblem(first.line, "model_not_found", f"body.model {name!r} is not a registered model of "
                                 "yours: give the id of one (GET /v1/models)", "body.model"))
        return
    context = model_context(model)
    for request in read.requests:
        if request.sampling is not None and request.sampling.max_new_tokens >= context:
            read.report(BatchProblem(request.line, "invalid_value", f"body.max_tokens: {request.sampling.max_new_tokens} "
                                     f"new tokens leave no room for a prompt in the model's context of {context} "
                                     "tokens", "body.max_tokens"))


# Read


def get_batch(session: Session, owner: str, batch_id: str, for_update: bool = False) -> Batch:
    stmt = select(Batch).where(Batch.id == batch_id, Batch.owner == owner)
    if for_update:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    batch = session.scalars(stmt).one_or_none()
    if batch is None:
        raise NotFound("batch", batch_id)
    return batch


def list_batches(session: Session, owner: str, after: str | None = None,
                 limit: int = 20) -> tuple[list[Batch], bool]:
    """The owner's batches, newest first; `after` is the last id of the previous page."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE_SIZE}", param="limit")
    stmt = select(Batch).where(Batch.owner == owner)
    if after is not None:
        cursor = session.execute(select(Batch.created_at, Batch.id).where(Batch.id == after, Batch.owner == owner)
                                 ).one_or_none()
        if cursor is None:
            raise InvalidInput(f"Unknown cursor {after!r}", param="after")
        stmt = stmt.where(or_(Batch.created_at < cursor.created_at,
                              and_(Batch.created_at == cursor.created_at, Batch.id < cursor.id)))
    rows = session.scalars(stmt.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


def usage_object(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}


def live_usage(session: Session, job_id: str) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of the job's results so far (failed requests have no usage)."""
    prompt, completion = session.execute(
        select(func.coalesce(func.sum(GenerationResult.usage["prompt_tokens"].as_integer()), 0),
               func.coalesce(func.sum(GenerationResult.usage["completion_tokens"].as_integer()), 0))
        .where(GenerationResult.job_id == job_id)).one()
    return int(prompt), int(completion)


def finalizing_at(batch: Batch, job: Job | None, outcome: str | None) -> int | None:
    """When the batch began finalizing: when the window passed (an expiring batch), else when its job ended;
    None for a batch that was cancelled (OpenAI's cancel path has no finalizing) or failed validation."""
    if outcome == "cancelled" or (outcome is None and batch.cancelling_at is not None):
        return None
    if batch.expired_at is not None:
        return unix_time(batch.expired_at)
    return unix_time(job.finished_at) if job is not None and job.status in TERMINAL else None


def batch_object(session: Session, batch: Batch) -> dict[str, Any]:
    """The batch as OpenAI's batch object (what the `openai` SDK's Batch reads)."""
    job = session.get(Job, batch.job_id) if batch.job_id is not None else None
    outcome = batch.outcome
    if batch.request_counts is not None:
        counts = dict(batch.request_counts)
    else:
        progress = (job.progress if job is not None else None) or {}
        counts = {"total": progress.get("total") or 0, "completed": progress.get("completed") or 0,
                  "failed": progress.get("failed") or 0}
    if batch.usage is not None:
        usage = usage_object(batch.usage["input_tokens"], batch.usage["output_tokens"])
    elif job is not None:
        usage = usage_object(*live_usage(session, job.id))
    else:
        usage = usage_object(0, 0)
    finished = unix_time(batch.finished_at)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch_status(batch, job),
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix_time(batch.created_at),
        "in_progress_at": unix_time(job.started_at) if job is not None else None,
        "expires_at": unix_time(batch.expires_at),
        "finalizing_at": finalizing_at(batch, job, outcome),
        "completed_at": finished if outcome == "completed" else None,
        "failed_at": finished if outcome == "failed" else None,
        "expired_at": unix_time(batch.expired_at) if outcome in (None, "expired") else None,
        "cancelling_at": unix_time(batch.cancelling_at),
        "cancelled_at": finished if outcome == "cancelled" else None,
        "request_counts": counts,
        "metadata": batch.metadata_,
        "model": batch.model,
        "usage": usage,
        "job_id": batch.job_id,
    }


# Cancel and expire


def cancel_batch(session: Session, owner: str, batch_id: str, now: datetime | None = None) -> Batch:
    """Cancel the batch's job (repository.cancel_job: a queued or paused job at once, a running one once its
    worker stops); the batch is cancelling until finalized. Cancelling a cancelling batch changes nothing.
    Conflict once it has finished, expired or is being finalized."""
    batch = get_batch(session, owner, batch_id, for_update=True)
    job = session.get(Job, batch.job_id) if batch.job_id is not None else None
    if batch.outcome is not None:
        raise Conflict(f"Batch {batch_id!r} has already finished ({batch.outcome})", param=None)
    if batch.expired_at is not None:
        raise Conflict(f"Batch {batch_id!r} has expired; its results so far are being written", param=None)
    if batch.cancelling_at is not None and (job is None or job.status in TERMINAL):
        return batch  # cancelled already, being finalized: still cancelling
    if job is None or job.status in TERMINAL:
        raise Conflict(f"Batch {batch_id!r} has finished running; its results are being written (finalizing)",
                       param=None)
    if batch.cancelling_at is None:
        batch.cancelling_at = now or utcnow()
        repository.add_event(session, job.id, f"Batch {batch.id} cancelled")
    repository.cancel_job(session, owner, job.id)
    return batch


def expire_batch(session: Session, batch_id: str, now: datetime | None = None) -> bool:
    """If the batch is still unfinished past its expires_at (checked again under its row lock): mark it expired
    and cancel its job (cooperatively: shards being generated finish and are stored); True when it did."""
    now = now or utcnow()
    batch = session.scalars(select(Batch).where(Batch.id == batch_id).with_for_update()
                            .execution_options(populate_existing=True)).one_or_none()
    if batch is None or batch.outcome is not None or batch.expired_at is not None or batch.expires_at > now:
        return False
    batch.expired_at = now
    job = session.get(Job, batch.job_id) if batch.job_id is not None else None
    if job is not None and job.status not in TERMINAL:
        repository.add_event(session, job.id, f"Batch {batch.id} expired: its completion window of "
                             f"{batch.completion_window} passed; the job stops, and requests not done are not run",
                             level="warning")
        repository.cancel_job(session, batch.owner, job.id)
    return True


__all__ = ["BatchCreate", "batch_object", "batch_status", "cancel_batch", "create_batch", "expire_batch",
           "get_batch", "list_batches", "outcome_of"]
