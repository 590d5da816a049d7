"""/v1/batches: OpenAI's Batch API (create, list, retrieve, cancel) over our generate jobs (jobs.batches), so that
the `openai` SDK's client.batches drives them. The domain is jobs.batches; this only speaks HTTP."""
from __future__ import annotations

import logging

from jobs import batches as domain
from jobs import batch_output, repository
from jobs.batches import BatchCreate
from jobs.errors import BrokerUnavailable
from jobs.queue import enqueue

from .context import owner, page, paging, platform, unit_of_work, v1_blueprint
from .errors import ApiError
from .jobs import json_body

batches = v1_blueprint("batches")
log = logging.getLogger("api")


@batches.post("/batches")
def create_batch():
    """Create a batch from an input file of /v1/completions requests (purpose batch); a batch whose requests have
    problems is returned failed, listing them all in `errors`."""
    body = json_body("the batch")
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "body: the batch must be a JSON object", "body")
    batch_request = BatchCreate.model_validate(body)
    batch, job = domain.create_batch(platform().sessions, owner(), batch_request,
                                     max_inline_prompts=platform().settings.max_inline_prompts)
    if job is not None:
        try:
            enqueue(platform().celery, job.type, job.id, job.devices)
        except BrokerUnavailable:  # stored as queued: the workers' reconciliation sends it once the broker answers
            log.warning("job %s of batch %s stored but not sent: the broker is unreachable", job.id, batch.id)
            with unit_of_work() as session:
                repository.add_event(session, job.id, "The job queue could not be reached when the batch was "
                                     "created; the job is stored and is sent to the workers as soon as the queue "
                                     "answers", level="warning")
    with unit_of_work() as session:
        return domain.batch_object(session, domain.get_batch(session, owner(), batch.id))


@batches.get("/batches")
def list_batches():
    """List your batches, newest first (`after`, `limit`)."""
    with unit_of_work() as session:
        items, has_more = domain.list_batches(session, owner(), **paging())
        return page(items, has_more, lambda batch: domain.batch_object(session, batch))


@batches.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    """One batch: status, request counts, usage, and its output and error files once finalized."""
    with unit_of_work() as session:
        return domain.batch_object(session, domain.get_batch(session, owner(), batch_id))


@batches.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """Cancel a batch: cancelling until its job stops, then cancelled with the output so far; 409 once it has
    finished."""
    with unit_of_work() as session:
        domain.cancel_batch(session, owner(), batch_id)
    try:  # a job that was not running is cancelled at once: write the batch's files now
        batch_output.finalize_batch(platform().sessions, platform().artifacts, batch_id)
    except Exception:  # the workers' sweep finalizes it
        log.warning("batch %s: finalizing after the cancel failed; the workers' sweep will", batch_id, exc_info=True)
    with unit_of_work() as session:
        return domain.batch_object(session, domain.get_batch(session, owner(), batch_id))
