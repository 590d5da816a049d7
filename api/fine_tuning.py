"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API (create, list, get, cancel, pause, resume, events, checkpoints)
over our finetune jobs (jobs.fine_tuning), so the `openai` SDK's client.fine_tuning.jobs works unchanged."""
from __future__ import annotations

import logging

from flask import request

from jobs import fine_tuning, repository
from jobs.errors import BrokerUnavailable, InvalidInput, InvalidRequest
from jobs.fine_tuning import FineTuningJobRequest
from jobs.models import Job, Model
from jobs.queue import enqueue
from jobs.submission import submit_job

from .context import owner, page, paging, platform, unit_of_work, v1_blueprint
from .errors import ApiError
from .jobs import json_body

fine_tuning_jobs = v1_blueprint("fine_tuning")
log = logging.getLogger("api")


def finetune_job(session, job_id: str) -> Job:
    """The caller's finetune job `job_id`; 404 for any other job, as for a missing one."""
    job = repository.get_job(session, owner(), job_id)
    if job.type != "finetune":
        raise ApiError(404, "not_found", f"No fine-tuning job with id {job_id!r} (it is a {job.type} job: "
                       f"GET /v1/jobs/{job_id})", "fine_tuning_job_id")
    return job


def shown(session, job: Job) -> dict:
    base = session.get(Model, job.base_model_id) if job.base_model_id else None
    return fine_tuning.job_object(job, base)


def send(job: Job) -> None:
    try:
        enqueue(platform().celery, job.type, job.id, job.devices)
    except BrokerUnavailable:  # stored as queued: the workers' reconciliation sends it once the broker answers
        log.warning("job %s stored but not sent: the broker is unreachable", job.id)
        with unit_of_work() as session:
            repository.add_event(session, job.id, "The job queue could not be reached; the job is stored and is "
                                 "sent to the workers as soon as the queue answers", level="warning")


@fine_tuning_jobs.post("/fine_tuning/jobs")
def create_fine_tuning_job():
    """Create a fine-tuning job (OpenAI's request: model, training_file, hyperparameters, suffix, seed, ...)."""
    body = json_body("the fine-tuning job")
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "body: the fine-tuning job must be a JSON object", "body")
    wanted = FineTuningJobRequest.model_validate(body)
    with unit_of_work() as session:
        base = session.get(Model, wanted.model)
        if base is None or base.owner != owner():
            raise InvalidInput(f"No model with id {wanted.model!r}; fine-tune one of your registered models "
                               "(GET /v1/models)", param="model")
        spec = wanted.to_spec(base)
        job, _ = submit_job(session, owner(), spec, max_inline_prompts=platform().settings.max_inline_prompts,
                            keep_checkpoints=platform().settings.keep_checkpoints)
        answer = shown(session, job)
    send(job)
    return answer


@fine_tuning_jobs.get("/fine_tuning/jobs")
def list_fine_tuning_jobs():
    """Your fine-tuning jobs, newest first (`after` a job id, `limit`, `metadata[key]=value` filters)."""
    wanted = fine_tuning.metadata_filter(list(request.args.items(multi=True)))
    query = paging()
    with unit_of_work() as session:
        found: list[Job] = []
        after, has_more = query["after"], True
        while has_more and len(found) <= query["limit"]:
            jobs, has_more = repository.list_jobs(session, owner(), type="finetune", after=after, limit=100)
            found += [job for job in jobs if fine_tuning.matches(job, wanted)]
            after = jobs[-1].id if jobs else after
        items = found[:query["limit"]]
        return page(items, len(found) > query["limit"], lambda job: shown(session, job))


@fine_tuning_jobs.get("/fine_tuning/jobs/<fine_tuning_job_id>")
def get_fine_tuning_job(fine_tuning_job_id: str):
    """One fine-tuning job: status, hyperparameters as they ran, fine_tuned_model once it succeeded."""
    with unit_of_work() as session:
        return shown(session, finetune_job(session, fine_tuning_job_id))


@fine_tuning_jobs.post("/fine_tuning/jobs/<fine_tuning_job_id>/cancel")
def cancel_fine_tuning_job(fine_tuning_job_id: str):
    """Cancel: a queued or paused job at once, a running one stops at its next step (cancelling)."""
    with unit_of_work() as session:
        finetune_job(session, fine_tuning_job_id)
        return shown(session, repository.cancel_job(session, owner(), fine_tuning_job_id))


@fine_tuning_jobs.post("/fine_tuning/jobs/<fine_tuning_job_id>/pause")
def pause_fine_tuning_job(fine_tuning_job_id: str):
    """Pause: the worker writes a checkpoint and stops (pausing, then paused)."""
    with unit_of_work() as session:
        finetune_job(session, fine_tuning_job_id)
        return shown(session, repository.pause_job(session, owner(), fine_tuning_job_id))


@fine_tuning_jobs.post("/fine_tuning/jobs/<fine_tuning_job_id>/resume")
def resume_fine_tuning_job(fine_tuning_job_id: str):
    """Resume a paused job from its last checkpoint."""
    with unit_of_work() as session:
        finetune_job(session, fine_tuning_job_id)
        job = repository.resume_job(session, owner(), fine_tuning_job_id)
        answer = shown(session, job)
    send(job)
    return answer


@fine_tuning_jobs.get("/fine_tuning/jobs/<fine_tuning_job_id>/events")
def list_fine_tuning_events(fine_tuning_job_id: str):
    """The job's events, newest first (`after` an event id, `limit`)."""
    query = paging()
    after = fine_tuning.event_cursor(query["after"])
    with unit_of_work() as session:
        finetune_job(session, fine_tuning_job_id)
        items, has_more = repository.list_events(session, owner(), fine_tuning_job_id, after=after,
                                                 limit=query["limit"], newest_first=True)
        return page(items, has_more, fine_tuning.event_object)


@fine_tuning_jobs.get("/fine_tuning/jobs/<fine_tuning_job_id>/checkpoints")
def list_fine_tuning_checkpoints(fine_tuning_job_id: str):
    """The job's checkpoints, newest first (`after` a checkpoint id, `limit`), with the model made from each."""
    query = paging()
    with unit_of_work() as session:
        job = finetune_job(session, fine_tuning_job_id)
        checkpoints = repository.list_checkpoints(session, owner(), job.id)[::-1]
        if query["after"] is not None:
            ids = [checkpoint.id for checkpoint in checkpoints]
            if query["after"] not in ids:
                raise InvalidRequest(f"Unknown cursor {query['after']!r}", param="after", status=400)
            checkpoints = checkpoints[ids.index(query["after"]) + 1:]
        models = fine_tuning.models_by_step(session, job)
        items = checkpoints[:query["limit"]]
        return page(items, len(checkpoints) > query["limit"],
                    lambda checkpoint: fine_tuning.checkpoint_object(checkpoint, job, models.get(checkpoint.step)))
