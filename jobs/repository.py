"""Persistence operations. Every function takes a Session and leaves commit/rollback to the caller's
`session_scope`, so one call site is one transaction.

Functions that serve a tenant take `owner`; rows of other owners behave exactly like missing rows (NotFound).
Lists are newest first with an id cursor (`after`) and return `(items, has_more)`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from sqlalchemy import Select, and_, delete, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.errors import Conflict, InvalidInput, InvalidRequest, NotFound
from jobs.models import (
    FILE_PURPOSES,
    JOB_TYPES,
    MODEL_SOURCES,
    NAME_LENGTH,
    ApiKey,
    Checkpoint,
    DeletedItem,
    File,
    GenerationResult,
    Job,
    JobEvent,
    JobMetric,
    Model,
    new_id,
)
from jobs.states import CANCELLED, CANCELLING, PAUSED, PAUSING, QUEUED, RUNNING, STATUSES, TERMINAL, transition
from jobs.storage import StoredBlob
from jobs.text import check_name

MAX_PAGE_SIZE = 100
API_KEY_PREFIX = "sk-"
API_KEY_DISPLAY_CHARS = 10

Owned = TypeVar("Owned", ApiKey, File, Job, Model)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hash_request(body: Mapping[str, Any]) -> str:
    """A fingerprint of a request body for idempotency: sha256 of its canonical JSON (key order ignored)."""
    return _sha256_hex(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def _get_owned(session: Session, model: type[Owned], owner: str, id: str, resource: str,
               for_update: bool = False) -> Owned:
    stmt = select(model).where(model.id == id, model.owner == owner)
    if for_update:
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFound(resource, id)
    return row


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE_SIZE}", param="limit")


#: How long a deleted file's or model's place in its list is remembered, so that a page whose last item was
#: deleted can still be followed ("for f in client.files.list(): client.files.delete(f.id)").
DELETED_CURSOR_DAYS = 7


def remember_deleted(session: Session, item: File | Model) -> None:
    """Keep a deleted item's place (id, owner, created_at) as a cursor, and forget places older than
    DELETED_CURSOR_DAYS."""
    session.execute(delete(DeletedItem).where(DeletedItem.deleted_at < _utcnow() - timedelta(days=DELETED_CURSOR_DAYS)))
    session.add(DeletedItem(id=item.id, owner=item.owner, created_at=item.created_at))


def _newest_first_page(session: Session, stmt: Select, model: type[Owned], owner: str, after: str | None,
                       limit: int, oldest_first: bool = False) -> tuple[list[Owned], bool]:
    """One page of `stmt` ordered by (created_at, id) descending (ascending with `oldest_first`), starting after
    the row whose id is `after`."""
    _check_limit(limit)
    if after is not None:
        cursor = session.execute(
            select(model.created_at, model.id).where(model.id == after, model.owner == owner)
        ).one_or_none()
        if cursor is None:  # deleted since the page that named it was read: its place is remembered
            cursor = session.execute(select(DeletedItem.created_at, DeletedItem.id).where(
                DeletedItem.id == after, DeletedItem.owner == owner)).one_or_none()
        if cursor is None:
            raise InvalidInput(f"Unknown cursor {after!r}", param="after")
        if oldest_first:
            stmt = stmt.where(or_(model.created_at > cursor.created_at,
                                  and_(model.created_at == cursor.created_at, model.id > cursor.id)))
        else:
            stmt = stmt.where(
                or_(
                    model.created_at < cursor.created_at,
                    and_(model.created_at == cursor.created_at, model.id < cursor.id),
                )
            )
    order = (model.created_at, model.id) if oldest_first else (model.created_at.desc(), model.id.desc())
    rows = session.scalars(stmt.order_by(*order).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


# API keys


def create_api_key(session: Session, owner: str) -> tuple[ApiKey, str]:
    """A new key for `owner`, and its secret: shown once, stored only as a sha256 hash. InvalidInput for an owner
    that is not a storable name (empty, over 255 characters, control characters)."""
    problem = check_name(owner, "owner", NAME_LENGTH)
    if problem:
        raise InvalidInput(problem, param="owner")
    secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(owner=owner, key_hash=_sha256_hex(secret), prefix=secret[:API_KEY_DISPLAY_CHARS])
    session.add(key)
    session.flush()
    return key, secret


def authenticate(session: Session, secret: str) -> str | None:
    """The owner of an active key with this secret, or None."""
    secret_hash = _sha256_hex(secret)
    key = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == secret_hash, ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if key is None or not hmac.compare_digest(key.key_hash, secret_hash):
        return None
    return key.owner


def list_api_keys(session: Session, owner: str) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.owner == owner).order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
        )
    )


def revoke_api_key(session: Session, owner: str, key_id: str) -> ApiKey:
    """Revoke a key (idempotent: revoking a revoked key keeps its first revocation time)."""
    key = _get_owned(session, ApiKey, owner, key_id, "api key")
    if key.revoked_at is None:
        key.revoked_at = _utcnow()
    return key


# Files


def create_file(session: Session, owner: str, purpose: str, filename: str, blob: StoredBlob, records: int,
                file_id: str | None = None, tokens: int | None = None) -> File:
    """Record an upload already written by ArtifactStore.write_stream (pass the id its path was made from)."""
    if purpose not in FILE_PURPOSES:
        raise InvalidInput(f"purpose must be one of {', '.join(FILE_PURPOSES)}", param="purpose")
    file = File(
        id=file_id or new_id("file"),
        owner=owner,
        purpose=purpose,
        filename=filename,
        bytes=blob.bytes,
        sha256=blob.sha256,
        records=records,
        tokens=tokens,
        storage_path=str(blob.path),
    )
    session.add(file)
    session.flush()
    return file


def get_file(session: Session, owner: str, file_id: str) -> File:
    return _get_owned(session, File, owner, file_id, "file")


def list_files(session: Session, owner: str, purpose: str | None = None, after: str | None = None,
               limit: int = 20, order: str = "desc") -> tuple[list[File], bool]:
    """The owner's files, newest first (`order` "desc") or oldest first ("asc"), of one purpose if given."""
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc", param="order", status=400)
    stmt = select(File).where(File.owner == owner)
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    return _newest_first_page(session, stmt, File, owner, after, limit, oldest_first=order == "asc")


def delete_file(session: Session, owner: str, file_id: str) -> File:
    """Delete the row and return it (remove its storage_path after commit). Conflict while an unfinished job
    uses the file; finished jobs keep running history with the reference set to NULL. The file row is locked
    first, so a job being submitted for it either commits before (and this sees it) or finds no file."""
    file = _get_owned(session, File, owner, file_id, "file", for_update=True)
    in_use = session.scalars(
        select(Job.id)
        .where(
            or_(Job.training_file_id == file_id, Job.validation_file_id == file_id, Job.input_file_id == file_id),
            Job.status.not_in(TERMINAL),
        )
        .limit(1)
    ).first()
    if in_use is not None:
        raise Conflict(f"File {file_id!r} is used by unfinished job {in_use!r}", param="file_id")
    remember_deleted(session, file)
    session.delete(file)
    session.flush()
    return file


# Jobs

#: The purposes of the files a job may read: training text ("train", or OpenAI's "fine-tune", read alike), and
#: prompts (our "generate" lines, or OpenAI "batch" request lines: jobs.openai_batch).
TRAINING_PURPOSES = ("train", "fine-tune")
INPUT_PURPOSES = ("generate", "batch")


def _check_file_reference(session: Session, owner: str, file_id: str, purposes: tuple[str, ...], param: str) -> File:
    """The referenced file, share-locked until the job's transaction ends: a concurrent delete (which locks the
    row for update) waits and then sees the job, or deletes first and this finds no file. Never both."""
    file = session.scalars(
        select(File).where(File.id == file_id, File.owner == owner).with_for_update(read=True)
    ).one_or_none()
    if file is None:
        raise InvalidInput(f"No file with id {file_id!r}", param=param)
    if file.purpose not in purposes:
        wanted = " or ".join(repr(p) for p in purposes)
        raise InvalidInput(f"File {file_id!r} has purpose {file.purpose!r}; {param} needs {wanted}", param=param)
    return file


def _check_model_reference(session: Session, owner: str, model_id: str) -> Model:
    """The referenced model, share-locked like a file (see _check_file_reference)."""
    model = session.scalars(
        select(Model).where(Model.id == model_id, Model.owner == owner).with_for_update(read=True)
    ).one_or_none()
    if model is None:
        raise InvalidInput(f"No model with id {model_id!r}", param="model")
    return model


def _find_idempotent(session: Session, owner: str, idempotency_key: str, request_hash: str) -> Job | None:
    job = session.scalars(
        select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
    ).one_or_none()
    if job is not None and job.request_hash != request_hash:
        raise Conflict(
            f"Idempotency key {idempotency_key!r} was already used with a different request",
            param="idempotency_key",
        )
    return job


def create_job(
    session: Session,
    owner: str,
    type: str,
    params: dict[str, Any],
    *,
    training_file_id: str | None = None,
    validation_file_id: str | None = None,
    input_file_id: str | None = None,
    base_model_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    devices: int = 1,
) -> tuple[Job, bool]:
    """A new queued job, or, when `idempotency_key` was used before by this owner with the same
    `request_hash`, the original job. Returns (job, created); enqueue only when created.
    The same key with a different request_hash is a Conflict."""
    if (idempotency_key is None) != (request_hash is None):
        raise ValueError("idempotency_key and request_hash go together")
    if idempotency_key is not None:
        assert request_hash is not None
        existing = _find_idempotent(session, owner, idempotency_key, request_hash)
        if existing is not None:
            return existing, False

    if type not in JOB_TYPES:
        raise InvalidInput(f"type must be one of {', '.join(JOB_TYPES)}", param="type")
    if type in ("train", "finetune") and training_file_id is None:
        raise InvalidInput(f"A {type} job needs a training file", param="training_file")
    if type == "finetune" and base_model_id is None:
        raise InvalidInput("A finetune job needs a base model", param="model")
    progress = None
    for file_id, purposes, param in (
        (training_file_id, TRAINING_PURPOSES, "training_file"),
        (validation_file_id, TRAINING_PURPOSES, "validation_file"),
        (input_file_id, INPUT_PURPOSES, "input_file"),
    ):
        if file_id is not None:
            file = _check_file_reference(session, owner, file_id, purposes, param)
            if param == "input_file":
                progress = {"total": file.records, "completed": 0, "failed": 0}
    if base_model_id is not None:
        _check_model_reference(session, owner, base_model_id)

    job = Job(
        id=new_id("job"),
        owner=owner,
        type=type,
        status=QUEUED,
        params=params,
        training_file_id=training_file_id,
        validation_file_id=validation_file_id,
        input_file_id=input_file_id,
        base_model_id=base_model_id,
        metadata_=metadata or {},
        progress=progress,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        devices=devices,
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.add(JobEvent(job_id=job.id, message=f"Created {type} job {job.id}"))
    except IntegrityError:
        # A concurrent request with the same idempotency key won the insert.
        if idempotency_key is None or request_hash is None:
            raise
        existing = _find_idempotent(session, owner, idempotency_key, request_hash)
        if existing is None:
            raise
        return existing, False
    return job, True


def get_job(session: Session, owner: str, job_id: str) -> Job:
    return _get_owned(session, Job, owner, job_id, "job")


def list_jobs(session: Session, owner: str, type: str | None = None, status: str | None = None,
              after: str | None = None, limit: int = 20) -> tuple[list[Job], bool]:
    if type is not None and type not in JOB_TYPES:
        raise InvalidRequest(f"type must be one of {', '.join(JOB_TYPES)}", param="type", status=400)
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", param="status", status=400)
    stmt = select(Job).where(Job.owner == owner)
    if type is not None:
        stmt = stmt.where(Job.type == type)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return _newest_first_page(session, stmt, Job, owner, after, limit)


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """queued or paused: cancelled at once. running or pausing: cancelling (the worker stops and finishes the
    transition). cancelling: unchanged. Finished: Conflict."""
    job = _get_owned(session, Job, owner, job_id, "job", for_update=True)
    if job.status == QUEUED:
        transition(job, CANCELLED)
        add_event(session, job.id, "Job cancelled before it started", data={"status": CANCELLED})
    elif job.status == PAUSED:
        transition(job, CANCELLED)
        add_event(session, job.id, "Job cancelled while paused", data={"status": CANCELLED})
    elif job.status in (RUNNING, PAUSING):
        transition(job, CANCELLING)
        add_event(session, job.id, "Cancellation requested", data={"status": CANCELLING})
    elif job.status in TERMINAL:
        raise Conflict(f"Job {job_id!r} has already finished ({job.status})", param=None)
    return job


def pause_job(session: Session, owner: str, job_id: str) -> Job:
    """queued: paused at once (a worker that receives its message leaves it alone). running: pausing (a training
    job's worker writes a checkpoint and frees itself; a generate job takes no new shards and is paused once the
    shards being generated are stored); the worker finishes the transition. pausing or paused: unchanged.
    Cancelling or finished: Conflict."""
    job = _get_owned(session, Job, owner, job_id, "job", for_update=True)
    if job.status == QUEUED:
        transition(job, PAUSED)
        add_event(session, job.id, "Job paused before a worker took it", data={"status": PAUSED})
    elif job.status == RUNNING:
        transition(job, PAUSING)
        add_event(session, job.id, "Pause requested", data={"status": PAUSING})
    elif job.status not in (PAUSING, PAUSED):
        raise Conflict(f"Job {job_id!r} cannot be paused: it is {job.status}", param=None)
    return job


def resume_job(session: Session, owner: str, job_id: str, now: datetime | None = None,
               devices: int | None = None) -> Job:
    """paused: queued again, marked as sent now (the caller sends its message after the commit; if that fails,
    the workers' reconciliation sends one): it continues from its last checkpoint, or with its remaining shards.
    `devices`: a training job continues on that many devices (InvalidRequest when its global batch does not split
    across them, or for a generate job). Any other status: Conflict (a pausing job can be resumed once it is
    paused)."""
    from jobs.specs import TrainSpec, check_batch_split, job_spec

    job = _get_owned(session, Job, owner, job_id, "job", for_update=True)
    if job.status != PAUSED:
        hint = "; resume it once it is paused" if job.status == PAUSING else ""
        raise Conflict(f"Job {job_id!r} cannot be resumed: it is {job.status}, not paused{hint}", param=None)
    moved = ""
    if devices is not None and devices != job.devices:
        spec = job_spec(job)
        if not isinstance(spec, TrainSpec):
            raise InvalidRequest("devices: only training and fine-tuning jobs run on several devices; a generate "
                                 "job's shards spread over the workers by themselves", param="devices")
        try:
            check_batch_split(spec.hyperparameters, devices)
        except ValueError as exc:
            raise InvalidRequest(f"devices: {exc}", param="devices") from None
        moved = f" on {devices} device{'s' * (devices != 1)} (it was on {job.devices})"
        job.params = {**job.params, "devices": devices}
        job.devices = devices
        job.devices_wanted_since = None
    transition(job, QUEUED)
    job.dispatched_at = now or _utcnow()
    add_event(session, job.id, f"Resume requested{moved}: the job is back in the queue",
              data={"status": QUEUED, "devices": job.devices})
    return job


# Events


def add_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, message=message, level=level, type=type, data=data)
    session.add(event)
    session.flush()
    return event


def list_events(session: Session, owner: str, job_id: str, after: int | None = None,
                limit: int = 20, newest_first: bool = False) -> tuple[list[JobEvent], bool]:
    """A job's events oldest first (or `newest_first`, as OpenAI's fine-tuning events); `after` is the id of the
    last event already seen (the next page holds newer events, or older ones when newest first)."""
    _check_limit(limit)
    get_job(session, owner, job_id)
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.id < after if newest_first else JobEvent.id > after)
    order = JobEvent.id.desc() if newest_first else JobEvent.id
    rows = session.scalars(stmt.order_by(order).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


# Checkpoints


def list_checkpoints(session: Session, owner: str, job_id: str) -> list[Checkpoint]:
    """A job's checkpoints by step."""
    get_job(session, owner, job_id)
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


# Training metrics

#: The most metric rows one request returns: a whole run's, for any run up to 10,000 steps.
MAX_METRICS_PAGE_SIZE = 10_000


def list_job_metrics(session: Session, owner: str, job_id: str, after: int | None = None,
                     limit: int = MAX_METRICS_PAGE_SIZE) -> tuple[list[JobMetric], bool]:
    """A train or finetune job's per-step metrics by step (jobs.training_metrics); `after` is the last step
    already seen. A generate job has none: InvalidRequest (400) naming job_id."""
    if not 1 <= limit <= MAX_METRICS_PAGE_SIZE:
        raise InvalidInput(f"limit must be between 1 and {MAX_METRICS_PAGE_SIZE}", param="limit")
    job = get_job(session, owner, job_id)
    if job.type == "generate":
        raise InvalidRequest("generate jobs have no training metrics", param="job_id", status=400)
    stmt = select(JobMetric).where(JobMetric.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobMetric.step > after)
    rows = session.scalars(stmt.order_by(JobMetric.step).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit


# Models


def create_model(session: Session, owner: str, name: str, source: str, storage_path: str,
                 config: dict[str, Any], parameter_count: int, *, job_id: str | None = None,
                 model_id: str | None = None) -> Model:
    if source not in MODEL_SOURCES:
        raise InvalidInput(f"source must be one of {', '.join(MODEL_SOURCES)}", param="source")
    model = Model(
        id=model_id or new_id("model"),
        owner=owner,
        name=name,
        source=source,
        job_id=job_id,
        config=config,
        parameter_count=parameter_count,
        storage_path=storage_path,
    )
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, owner: str, model_id: str) -> Model:
    return _get_owned(session, Model, owner, model_id, "model")


def list_models(session: Session, owner: str, after: str | None = None,
                limit: int = 20) -> tuple[list[Model], bool]:
    return _newest_first_page(session, select(Model).where(Model.owner == owner), Model, owner, after, limit)


def delete_model(session: Session, owner: str, model_id: str) -> Model:
    """Delete the row and return it (remove its storage_path after commit). Conflict while an unfinished job
    builds on it. Locks the model row first, as delete_file does."""
    model = _get_owned(session, Model, owner, model_id, "model", for_update=True)
    in_use = session.scalars(
        select(Job.id).where(Job.base_model_id == model_id, Job.status.not_in(TERMINAL)).limit(1)
    ).first()
    if in_use is not None:
        raise Conflict(f"Model {model_id!r} is used by unfinished job {in_use!r}", param="model_id")
    remember_deleted(session, model)
    session.delete(model)
    session.flush()
    return model


# Generation results


def list_generation_results(session: Session, owner: str, job_id: str, after: int | None = None,
                            limit: int = 20) -> tuple[list[GenerationResult], bool]:
    """A generate job's results in input order; `after` is the last index already seen."""
    _check_limit(limit)
    get_job(session, owner, job_id)
    stmt = select(GenerationResult).where(GenerationResult.job_id == job_id)
    if after is not None:
        stmt = stmt.where(GenerationResult.index > after)
    rows = session.scalars(stmt.order_by(GenerationResult.index).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit
