"""/v1/jobs: submit, list, fetch, cancel, pause and resume jobs; their events, checkpoints (any of which can be
registered as a model) and generation results."""
from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Iterator

from flask import Response, request

from jobs import checkpoint_models, repository
from jobs.db import session_scope
from jobs.errors import BrokerUnavailable, Conflict, InvalidInput
from jobs.models import Checkpoint, GenerationResult, Job, JobEvent
from jobs.queue import enqueue
from jobs.specs import JOB_SPEC, ResumeRequest
from jobs.states import TERMINAL
from jobs.submission import submit_job as submit
from jobs.models import NAME_LENGTH
from jobs.readers import parse_json_body
from jobs.text import storable

from .context import owner, page, paging, platform, unit_of_work, unix, v1_blueprint
from .errors import ApiError
from .model_routes import shape as model_object
from .event_stream import event_stream_response, last_event_id, wants_event_stream

jobs = v1_blueprint("jobs")
log = logging.getLogger("api")
RESULTS_PAGE = 100
#: An Idempotency-Key: printable ASCII (the OpenAPI document states the same pattern and length).
IDEMPOTENCY_KEY_PATTERN = r"^[ -~]+$"


def job_object(job: Job) -> dict[str, Any]:
    params = dict(job.params)
    prompts = params.pop("prompts", None)
    if prompts is not None:
        params["prompt_count"] = len(prompts)
    return {
        "id": job.id,
        "object": "job",
        "type": job.type,
        "status": job.status,
        "created_at": unix(job.created_at),
        "started_at": unix(job.started_at),
        "finished_at": unix(job.finished_at),
        "training_file": job.training_file_id,
        "validation_file": job.validation_file_id,
        "input_file": job.input_file_id,
        **params,
        "progress": job.progress or {},
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "metadata": job.metadata_,
    }


def json_body(what: str = "the job") -> Any:
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", f"Send {what} as JSON (Content-Type: application/json).")
    try:
        body = parse_json_body(request.get_data())
    except InvalidInput as exc:
        raise ApiError(400, "invalid_json", exc.message, "body") from None
    check_text(body)
    return body


def check_text(body: Any) -> None:
    """422 naming the first string (key or value) that is not text (an unpaired surrogate). NUL is text: the
    columns that keep users' words store it (jobs.text); identifiers refuse it by their own patterns."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not storable(key):
                    raise unstorable(path + (key,))
                stack.append((item, path + (key,)))
        elif isinstance(value, list):
            stack.extend((item, path + (str(i),)) for i, item in enumerate(value))
        elif isinstance(value, str) and not storable(value):
            raise unstorable(path)


def unstorable(path: tuple[str, ...]) -> ApiError:
    param = ".".join(part if storable(part) else ascii(part) for part in path) or "body"
    return ApiError(422, "invalid_request", f"{param}: text must not contain unpaired surrogates", param)


@jobs.post("/jobs")
def submit_job():
    """Submit a train, finetune or generate job; 202 with the queued job. `Idempotency-Key` makes retries safe."""
    body = json_body()
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "body: the job must be a JSON object", "body")
    if "type" not in body:
        raise ApiError(422, "invalid_request", "type: one of train, finetune, generate is required", "type")
    spec = JOB_SPEC.validate_python(body, context={"submission": True})
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (len(key) <= NAME_LENGTH and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)):
        raise ApiError(400, "invalid_request", f"Idempotency-Key must be 1 to {NAME_LENGTH} printable ASCII "
                       "characters.", "Idempotency-Key")
    try:
        with unit_of_work() as session:
            job, created = submit(
                session, owner(), spec, max_inline_prompts=platform().settings.max_inline_prompts,
                keep_checkpoints=platform().settings.keep_checkpoints,
                idempotency_key=key, request_hash=repository.hash_request(body) if key is not None else None,
            )
            shown = job_object(job)
    except Conflict as exc:
        if exc.param != "idempotency_key":
            raise
        # The key was used with another body: name the header, as the 400 for a malformed key does.
        raise ApiError(409, exc.code, exc.message, "Idempotency-Key") from None
    if created:
        try:
            enqueue(platform().celery, job.type, job.id, job.devices)
        except BrokerUnavailable:
            # The job is stored, and the database is the source of truth: the workers' reconciliation sends it
            # once the broker answers again (jobs.recovery). Say so in its events.
            log.warning("job %s stored but not sent: the broker is unreachable", job.id)
            with unit_of_work() as session:
                repository.add_event(session, job.id, "The job queue could not be reached when the job was "
                                     "submitted; the job is stored and is sent to the workers as soon as the queue "
                                     "answers", level="warning")
    return shown, 202, {"Location": f"/v1/jobs/{job.id}"}


@jobs.get("/jobs")
def list_jobs():
    """List your jobs, newest first (`type`, `status`, `after`, `limit`)."""
    with unit_of_work() as session:
        items, has_more = repository.list_jobs(
            session, owner(), type=request.args.get("type"), status=request.args.get("status"), **paging()
        )
        return page(items, has_more, job_object)


@jobs.get("/jobs/<job_id>")
def get_job(job_id: str):
    """One job: status, resolved parameters, progress, result and error."""
    with unit_of_work() as session:
        return job_object(repository.get_job(session, owner(), job_id))


@jobs.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Cancel: a queued job is cancelled at once, a running one becomes cancelling; 409 once finished."""
    with unit_of_work() as session:
        return job_object(repository.cancel_job(session, owner(), job_id))


@jobs.post("/jobs/<job_id>/pause")
def pause_job(job_id: str):
    """Pause: a queued job is paused at once; a running one becomes pausing until its worker stops at a
    checkpoint (training) or its shards being generated are stored (generation), then paused. 409 once it is
    cancelling or finished; a pausing or paused job is returned unchanged."""
    with unit_of_work() as session:
        return job_object(repository.pause_job(session, owner(), job_id))


@jobs.post("/jobs/<job_id>/resume")
def resume_job(job_id: str):
    """Resume a paused job: queued again, it continues from its checkpoint (training: the same losses as a run
    never paused) or with the prompts not done yet (generation). Optional JSON `{"devices": N}`: a training job
    continues on N devices (the same global batch; 422 when it does not split evenly). 409 unless paused."""
    devices = None
    if request.get_data():
        devices = ResumeRequest.model_validate(json_body('the body ({"devices": N})')).devices
    with unit_of_work() as session:
        job = repository.resume_job(session, owner(), job_id, devices=devices)
        shown = job_object(job)
    try:
        enqueue(platform().celery, job.type, job.id, job.devices)
    except BrokerUnavailable:  # stored as queued: the workers' reconciliation sends it once the broker answers
        log.warning("job %s resumed but not sent: the broker is unreachable", job.id)
    return shown


def event_object(event: JobEvent) -> dict[str, Any]:
    return {"id": event.id, "object": "job.event", "created_at": unix(event.created_at), "level": event.level,
            "type": event.type, "message": event.message, "data": event.data}


@jobs.get("/jobs/<job_id>/events")
def list_events(job_id: str):
    """The job's events, oldest first (`after` an event id, or Last-Event-ID; `limit`). With `Accept:
    text/event-stream`, a live stream of them and of the job's progress until it has finished (api.event_stream)."""
    if wants_event_stream():
        return event_stream_response(job_id, job_object, event_object)
    query = {**paging(int), "after": last_event_id()}
    with unit_of_work() as session:
        items, has_more = repository.list_events(session, owner(), job_id, **query)
        return page(items, has_more, event_object)


def checkpoint_object(checkpoint: Checkpoint) -> dict[str, Any]:
    """Metrics: the step's training loss; validation loss, perplexity and token accuracy when the step was an
    evaluation step (null otherwise)."""
    val_loss = checkpoint.val_loss
    return {"id": checkpoint.id, "object": "job.checkpoint", "step": checkpoint.step,
            "train_loss": checkpoint.train_loss, "val_loss": val_loss,
            "val_perplexity": None if val_loss is None else perplexity(val_loss),
            "val_accuracy": checkpoint.val_accuracy,
            "created_at": unix(checkpoint.created_at), "bytes": checkpoint.bytes}


def perplexity(loss: float) -> float | None:
    """exp(loss); None (JSON null) where it overflows a double."""
    return math.exp(loss) if loss < 709 else None


@jobs.get("/jobs/<job_id>/checkpoints")
def list_checkpoints(job_id: str):
    """The job's checkpoints, by step."""
    with unit_of_work() as session:
        return page(repository.list_checkpoints(session, owner(), job_id), False, checkpoint_object)


@jobs.post("/jobs/<job_id>/checkpoints/<checkpoint_id>/model")
def register_checkpoint(job_id: str, checkpoint_id: str):
    """Register one of the job's checkpoints as a model (optional JSON `{"name": ...}`): 201 with the model, or
    200 with the one this checkpoint already made. Any status of the job: running, paused, failed, finished."""
    name = None
    if request.get_data():
        body = json_body('the body ({"name": ...})')
        if not isinstance(body, dict) or set(body) - {"name"}:
            raise ApiError(422, "invalid_request", 'body: give nothing, or {"name": "<model name>"}', "body")
        if not isinstance(body.get("name"), (str, type(None))):
            raise ApiError(422, "invalid_request", "name: a string, or null for the default name", "name")
        name = body.get("name")
    model, created = checkpoint_models.register_checkpoint(
        platform().sessions, platform().artifacts, owner(), job_id, checkpoint_id, name)
    return model_object(model), 201 if created else 200, {"Location": f"/v1/models/{model.id}"}


def result_object(result: GenerationResult) -> dict[str, Any]:
    return {"id": result.index, "custom_id": result.custom_id, "index": result.index, "prompt": result.prompt,
            "completions": result.completions, "usage": result.usage, "error": result.error}


def generation_job(session, job_id: str) -> Job:
    job = repository.get_job(session, owner(), job_id)
    if job.type != "generate":
        raise ApiError(400, "invalid_request", f"{job.type} jobs have no generation results", "job_id")
    return job


def results_headers(job: Job) -> dict[str, str]:
    """What a results answer says about its completeness: `Job-Status` (the job's status when it was read) and
    `Results-Partial: true` while the job can still add results (queued, running, cancelling): the results so
    far, in input order, with the prompts not done yet missing."""
    return {"Job-Status": job.status, "Results-Partial": "false" if job.status in TERMINAL else "true"}


@jobs.get("/jobs/<job_id>/results")
def list_results(job_id: str):
    """Generation results in input order, paged (`after` an index, `limit`); partial while the job runs."""
    with unit_of_work() as session:
        headers = results_headers(generation_job(session, job_id))
        items, has_more = repository.list_generation_results(session, owner(), job_id, **paging(int))
        return page(items, has_more, result_object), 200, headers


@jobs.get("/jobs/<job_id>/results.jsonl")
def stream_results(job_id: str):
    """Every generation result as JSON lines, in input order, streamed; partial while the job runs."""
    caller, sessions = owner(), platform().sessions
    with unit_of_work() as session:
        headers = results_headers(generation_job(session, job_id))

    def lines() -> Iterator[str]:
        # Runs after the view has returned, outside the app context: only what was captured above.
        after = None
        while True:
            with session_scope(sessions) as session:
                items, has_more = repository.list_generation_results(session, caller, job_id, after=after,
                                                                     limit=RESULTS_PAGE)
                chunk = [result_object(r) for r in items]
            for item in chunk:
                item.pop("id")
                yield json.dumps(item, ensure_ascii=False) + "\n"
            if not has_more:
                return
            after = chunk[-1]["index"]

    return Response(lines(), content_type="application/x-ndjson; charset=utf-8",
                    headers={"Content-Disposition": f"attachment; filename={job_id}-results.jsonl", **headers})
