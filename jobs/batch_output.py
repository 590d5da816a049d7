"""A batch's results: its output and error files in OpenAI's batch output format, written once its job has ended
(finalization), and the workers' sweep that expires batches past their window and finalizes the ones whose job
ended. The batch itself (create, status, cancel, expire) is jobs.batches; see its docstring for the whole story.

Output line (a request that completed)::

    {"id": "batch_req_...", "custom_id": "q1", "error": null, "response": {"status_code": 200, "request_id": "req_...",
     "body": {"id": "cmpl-...", "object": "text_completion", "created": 1795549601, "model": "model-...",
              "choices": [{"text": "...", "index": 0, "logprobs": null, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}}}}

Error line: a request that ran and failed, with the error response /v1/completions would give (400 when the request
is at fault, else 500), or one that never ran (``"response": null, "error": {"code": "batch_expired" | ...}``).
Ids are derived from the batch and the request's position, so a file written twice is the same file.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from jobs import repository
from jobs.batches import expire_batch, outcome_of
from jobs.db import session_scope
from jobs.errors import InvalidInput
from jobs.models import Batch, File, GenerationResult, Job, new_id, unix_time, utcnow
from jobs.openai_batch import read_batch_file
from jobs.states import TERMINAL
from jobs.storage import ArtifactStore, AtomicWriter, StoredBlob

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
        "created": unix_time(result.created_at),
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
