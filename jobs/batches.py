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
* **Finalize** (:func:`finalize_batch`): once the job has ended, the output file (a line per request that
  completed) and the error file (a line per request that failed, or did not run because the batch expired, was
  cancelled or failed) are written to the artifact store and recorded as files with purpose "batch_output" owned
  by the batch's owner (a file that would be empty is not made: its id stays null, as OpenAI does), and the
  outcome is stored. Once: the files are written first, then the outcome is stored under the batch's row lock
  only if no one stored it meanwhile (a loser removes its files), so two processes may try at once. Who tries:
  the worker that took part in the job, when its delivery ends (workers.generation.run_generation); the API, when
  a cancel ended the job at once; and every sweep of every worker (workers.sweeper -> :func:`sweep_batches`), for
  jobs that ended any other way (a lost worker, a cancel through /v1/jobs) or whose worker died first.
* **Expire** (:func:`expire_batch`, from :func:`sweep_batches`): a batch still unfinished past `expires_at`
  (created_at + completion_window) has its job cancelled cooperatively (repository.cancel_job: shards being
  generated finish and are stored), `expired_at` set; finalization then writes what was done and a
  "batch_expired" error line for every request that did not run, and the batch is "expired".
* **Cancel** (:func:`cancel_batch`): the job is cancelled (repository.cancel_job); the batch is "cancelling" until
  finalization makes it "cancelled" (with the partial output kept, and "batch_cancelled" lines for the rest).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from pydantic import Field, field_validator
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from jobs import repository
from jobs.db import session_scope
from jobs.errors import Conflict, InvalidInput, InvalidRequest, NotFound
from jobs.models import Batch, File, GenerationResult, Job, Model, new_id
from jobs.openai_batch import DEFAULT_MAX_TOKENS, SUPPORTED_ENDPOINTS, BatchInput, BatchProblem, read_batch_file
from jobs.repository import MAX_PAGE_SIZE
from jobs.specs import GenerateSpec, Metadata, ResourceId, Sampling, Strict
from jobs.states import CANCELLING, FAILED, QUEUED, SUCCEEDED, TERMINAL
from jobs.storage import ArtifactStore, AtomicWriter, StoredBlob
from jobs.submission import model_context, submit_job

log = logging.getLogger("jobs.batches")

BATCH_PREFIX = "batch_"
#: A completion window: a whole number of hours, 1 to 168 (a week); OpenAI's is "24h".
MAX_WINDOW_HOURS = 168
WINDOW_PATTERN = r"^([1-9]|[1-9][0-9]|1[0-5][0-9]|16[0-8])h$"
#: Results read per query while the output files are written.
RESULTS_PAGE = 500
#: Codes of per-request errors that are the request's fault (an output line with status 400; others are 500s).
CLIENT_ERRORS = frozenset({"prompt_too_long", "invalid_request", "invalid_value"})
#: Why requests that never ran did not, by the batch's outcome: OpenAI's codes, and a message.
NOT_RUN = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
    "failed": ("batch_failed", "This request was not executed: the batch failed."),
    "completed": ("batch_failed", "This request was not executed."),
}


def new_batch_id() -> str:
    """"batch_" and 24 random hex characters (96 bits), as OpenAI writes batch ids."""
    return BATCH_PREFIX + secrets.token_hex(12)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
    if job is None or job.status in TERMINAL or batch.expired_at is not None:
        return "finalizing"  # the job ended (or is stopping for good): the output files are being written
    if batch.cancelling_at is not None or job.status == CANCELLING:
        return "cancelling"
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
    NotFound for an input file that is not the caller's; InvalidRequest (param input_file_id, 400) for a file
    with another purpose. A batch whose requests have problems is returned failed, with no job."""
    now = now or utcnow()
    with session_scope(sessions) as session:
        file = repository.get_file(session, owner, request.input_file_id)
        if file.purpose != "batch":
            raise InvalidRequest(f"input_file_id: file {file.id!r} has purpose {file.purpose!r}; a batch needs a file "
                                 "uploaded with purpose 'batch'", param="input_file_id", status=400)
        path, filename = file.storage_path, file.filename
    # Read outside any transaction (the file is immutable; its row is locked again when the job is stored).
    try:
        with open(path, "rb") as stream:
            read = read_batch_file(stream, filename)
    except FileNotFoundError:
        raise NotFound("file", request.input_file_id) from None

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
                    raise NotFound("file", request.input_file_id) from None
                raise
            batch.job_id = job.id
            repository.add_event(session, job.id, f"Runs batch {batch.id}: {len(read.requests)} requests to "
                                 f"{request.endpoint}, to be done within {request.completion_window}")
        session.add(batch)
        session.flush()
    return batch, job


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


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


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
    finished = _unix(batch.finished_at)
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
        "created_at": _unix(batch.created_at),
        "in_progress_at": _unix(job.started_at) if job is not None else None,
        "expires_at": _unix(batch.expires_at),
        "finalizing_at": _unix(job.finished_at) if job is not None and job.status in TERMINAL else None,
        "completed_at": finished if outcome == "completed" else None,
        "failed_at": finished if outcome == "failed" else None,
        "expired_at": _unix(batch.expired_at) if outcome in (None, "expired") else None,
        "cancelling_at": _unix(batch.cancelling_at),
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


# Finalize


def _derived(prefix: str, batch_id: str, index: int, kind: str, length: int = 24) -> str:
    """An id derived from the batch and the request's position: the same whenever the files are written."""
    return prefix + hashlib.sha256(f"{batch_id}:{index}:{kind}".encode()).hexdigest()[:length]


def _line(batch_id: str, index: int, custom_id: str | None, response: dict[str, Any] | None,
          error: dict[str, Any] | None) -> bytes:
    body = {"id": _derived("batch_req_", batch_id, index, "line"), "custom_id": custom_id, "response": response,
            "error": error}
    return (json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8")


def output_line(batch_id: str, model: str | None, result: GenerationResult) -> bytes:
    """A completed request, as OpenAI's batch output line: the /v1/completions response it would have given."""
    usage = result.usage or {}
    body = {
        "id": _derived("cmpl-", batch_id, result.index, "completion"),
        "object": "text_completion",
        "created": _unix(result.created_at),
        "model": model,
        "choices": [{"text": c.get("text", ""), "index": c.get("index", i), "logprobs": None,
                     "finish_reason": c.get("finish_reason")} for i, c in enumerate(result.completions or [])],
        "usage": {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
                  "total_tokens": usage.get("total_tokens", usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))},
    }
    response = {"status_code": 200, "request_id": _derived("req_", batch_id, result.index, "request", 32), "body": body}
    return _line(batch_id, result.index, result.custom_id, response, None)


def failed_line(batch_id: str, result: GenerationResult) -> bytes:
    """A request that ran and failed (its result's error), as the error response /v1/completions would give: 400
    when the request is at fault (prompt_too_long), else 500."""
    error = result.error or {}
    code = error.get("code") or "internal_error"
    status = 400 if code in CLIENT_ERRORS else 500
    body = {"error": {"message": error.get("message") or "The request failed.",
                      "type": "invalid_request_error" if status == 400 else "server_error",
                      "param": error.get("param"), "code": code}}
    response = {"status_code": status, "request_id": _derived("req_", batch_id, result.index, "request", 32),
                "body": body}
    return _line(batch_id, result.index, result.custom_id, response, None)


def not_run_line(batch_id: str, index: int, custom_id: str, outcome: str, job_error: dict[str, Any] | None) -> bytes:
    code, message = NOT_RUN[outcome]
    if outcome == "failed" and job_error:
        message = f"{message[:-1]} ({job_error.get('code')}: {job_error.get('message')})"
    return _line(batch_id, index, custom_id, None, {"code": code, "message": message})


def _results(sessions: sessionmaker[Session], job_id: str) -> Iterator[GenerationResult]:
    """The job's results in input order, read a page at a time (one short transaction each)."""
    after = -1
    while True:
        with session_scope(sessions) as session:
            rows = list(session.scalars(select(GenerationResult).where(
                GenerationResult.job_id == job_id, GenerationResult.index > after)
                .order_by(GenerationResult.index).limit(RESULTS_PAGE)))
            session.expunge_all()
        yield from rows
        if len(rows) < RESULTS_PAGE:
            return
        after = rows[-1].index


@dataclass
class _Written:
    total: int = 0
    completed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def _write_files(sessions: sessionmaker[Session], batch: Batch, job: Job, outcome: str, input_file: File | None,
                 out: AtomicWriter, err: AtomicWriter) -> _Written:
    requests: list[tuple[int, str]] | None = None
    if input_file is not None:
        try:
            with open(input_file.storage_path, "rb") as stream:
                requests = [(r.index, r.custom_id) for r in read_batch_file(stream, input_file.filename).requests]
        except (OSError, InvalidInput):
            requests = None  # gone: the results alone say what ran
    written = _Written()
    pending = iter(requests or [])
    next_request = next(pending, None)

    def not_run_until(index: int | None) -> None:
        nonlocal next_request
        while next_request is not None and (index is None or next_request[0] < index):
            err.write(not_run_line(batch.id, next_request[0], next_request[1], outcome, job.error))
            written.total += 1
            next_request = next(pending, None)

    for result in _results(sessions, job.id):
        not_run_until(result.index)
        if next_request is not None and next_request[0] == result.index:
            next_request = next(pending, None)
        written.total += 1
        if result.error:
            err.write(failed_line(batch.id, result))
        else:
            out.write(output_line(batch.id, batch.model, result))
            written.completed += 1
            written.input_tokens += int((result.usage or {}).get("prompt_tokens", 0))
            written.output_tokens += int((result.usage or {}).get("completion_tokens", 0))
    not_run_until(None)
    if requests is None:
        written.total = max(written.total, int((job.progress or {}).get("total") or 0))
    return written


def finalize_batch(sessions: sessionmaker[Session], store: ArtifactStore, batch_id: str,
                   now: datetime | None = None) -> bool:
    """Write the output and error files of a batch whose job has ended and store its outcome; True when this call
    did. Nothing (False) for a batch already finalized, or whose job has not ended. Safe to call from several
    processes at once: the files are written first, the outcome stored under the batch's row lock only if no one
    stored it meanwhile; a loser removes its files."""
    with session_scope(sessions) as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.outcome is not None:
            return False
        job = session.get(Job, batch.job_id) if batch.job_id is not None else None
        if job is not None and job.status not in TERMINAL:
            return False
        input_file = session.get(File, job.input_file_id) if job is not None and job.input_file_id else None
        session.expunge_all()
    outcome = outcome_of(batch, job)
    blobs: dict[str, tuple[str, StoredBlob]] = {}
    written = _Written()
    try:
        if job is not None:
            output_id, error_id = new_id("file"), new_id("file")
            with store.writer(store.file_path(output_id)) as out, store.writer(store.file_path(error_id)) as err:
                written = _write_files(sessions, batch, job, outcome, input_file, out, err)
                for file_id, writer in ((output_id, out), (error_id, err)):
                    if writer.bytes:
                        blobs[file_id] = ("output" if writer is out else "error", writer.commit())
        stored = _store_outcome(sessions, batch, job, outcome, blobs, written, now or utcnow())
    except BaseException:
        for _, blob in blobs.values():
            store.delete(blob.path)
        raise
    if not stored:
        for _, blob in blobs.values():
            store.delete(blob.path)
    return stored


def _store_outcome(sessions: sessionmaker[Session], batch: Batch, job: Job | None, outcome: str,
                   blobs: dict[str, tuple[str, StoredBlob]], written: _Written, now: datetime) -> bool:
    with session_scope(sessions) as session:
        row = session.scalars(select(Batch).where(Batch.id == batch.id).with_for_update()
                              .execution_options(populate_existing=True)).one_or_none()
        if row is None or row.outcome is not None:
            return False
        for file_id, (kind, blob) in blobs.items():
            repository.create_file(session, row.owner, "batch_output", f"{row.id}_{kind}.jsonl", blob, blob.lines,
                                   file_id=file_id)
            if kind == "output":
                row.output_file_id = file_id
            else:
                row.error_file_id = file_id
        row.outcome, row.finished_at = outcome, now
        if outcome == "completed":
            row.expired_at = None  # it finished before it could be stopped
        row.request_counts = {"total": written.total, "completed": written.completed,
                              "failed": written.total - written.completed}
        row.usage = {"input_tokens": written.input_tokens, "output_tokens": written.output_tokens}
        if outcome == "failed":
            error = (job.error if job is not None else None) or {
                "code": "job_gone", "message": "The batch's job is gone.", "param": None}
            row.errors = [{"code": error.get("code"), "message": error.get("message"), "param": error.get("param"),
                           "line": None}]
        if job is not None:
            repository.add_event(session, job.id, f"Batch {row.id} {outcome}: {written.completed} of {written.total} "
                                 "requests completed", data={"batch": row.id, "status": outcome})
    return True


# The workers' sweep


@dataclass
class BatchSweep:
    """What one sweep did: batches expired (their jobs asked to stop), and batches finalized."""

    expired: list[str] = field(default_factory=list)
    finalized: list[str] = field(default_factory=list)


def batches_to_expire(session: Session, now: datetime | None = None, limit: int = 100) -> list[str]:
    now = now or utcnow()
    return list(session.scalars(
        select(Batch.id).where(Batch.outcome.is_(None), Batch.expired_at.is_(None), Batch.expires_at <= now)
        .order_by(Batch.expires_at, Batch.id).limit(limit)))


def batches_to_finalize(session: Session, limit: int = 100) -> list[str]:
    """Unfinalized batches whose job has ended (or is gone)."""
    return list(session.scalars(
        select(Batch.id).outerjoin(Job, Job.id == Batch.job_id)
        .where(Batch.outcome.is_(None), or_(Batch.job_id.is_(None), Job.status.in_(TERMINAL)))
        .order_by(Batch.created_at, Batch.id).limit(limit)))


def sweep_batches(sessions: sessionmaker[Session], store: ArtifactStore, now: datetime | None = None,
                  on_error: Callable[[str, Exception], None] | None = None) -> BatchSweep:
    """Expire the batches past their window, then finalize those whose job has ended (a job cancelled by expiry
    while queued or paused ends at once, and is finalized in the same sweep). `on_error(batch_id, exc)` decides
    about an error with one batch (log it, or raise); without it, errors propagate."""
    done = BatchSweep()
    with session_scope(sessions) as session:
        overdue = batches_to_expire(session, now)
    for batch_id in overdue:
        try:
            with session_scope(sessions) as session:
                if expire_batch(session, batch_id, now):
                    done.expired.append(batch_id)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(batch_id, exc)
    with session_scope(sessions) as session:
        ended = batches_to_finalize(session)
    for batch_id in ended:
        try:
            if finalize_batch(sessions, store, batch_id):
                done.finalized.append(batch_id)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(batch_id, exc)
    return done


def batch_of_job(session: Session, job_id: str) -> str | None:
    """The id of the unfinalized batch that runs this job, if any."""
    return session.scalars(select(Batch.id).where(Batch.job_id == job_id, Batch.outcome.is_(None))).first()


def finalize_job_batch(sessions: sessionmaker[Session], store: ArtifactStore, job_id: str) -> bool:
    """Finalize the batch that runs job `job_id`, if there is one and the job has ended (a worker calls this when
    its delivery of a generate job ends)."""
    with session_scope(sessions) as session:
        batch_id = batch_of_job(session, job_id)
    return batch_id is not None and finalize_batch(sessions, store, batch_id)


__all__ = ["BatchCreate", "BatchSweep", "batch_object", "batch_status", "cancel_batch", "create_batch",
           "expire_batch", "finalize_batch", "finalize_job_batch", "get_batch", "list_batches", "sweep_batches"]
