"""The OpenAPI 3.1 document, generated from the routes, the request schemas and the limits the server checks, and
a self-contained rendered reference.

Every bound the document states is imported from where the server enforces it (jobs.specs for job bodies, jobs.models
for names and enums, api.context for paging), so the two cannot drift; tests/api/test_schemathesis.py fuzzes the
served document against the served API with every schemathesis check.
"""
from __future__ import annotations

import html
from typing import Any

from flask import Blueprint, current_app, jsonify
from pydantic import TypeAdapter

from jobs.fine_tuning import EVENT_CURSOR_PATTERN
from jobs.fine_tuning import STATUS as FINE_TUNING_STATUS
from jobs.fine_tuning import FineTuningJobRequest
from jobs.batches import BatchCreate
from jobs.models import BATCH_OUTCOMES, EVENT_LEVELS, EVENT_TYPES, FILE_PURPOSES, JOB_TYPES, MODEL_SOURCES, NAME_LENGTH
from jobs.models import UPLOAD_PURPOSES
from jobs.specs import JobSpec as JobRequest
from jobs.specs import ResourceId, ResumeRequest
from jobs.states import STATUSES
from jobs.text import NAME_PATTERN

from jobs.repository import MAX_METRICS_PAGE_SIZE

from .context import DEFAULT_PAGE_SIZE, MAX_INT_CURSOR, MAX_PAGE_SIZE
from .files import FILE_ORDERS
from .jobs import IDEMPOTENCY_KEY_PATTERN

openapi = Blueprint("openapi", __name__)
#: Routes that are not part of the REST API: the web dashboard's pages and assets (api/dashboard.py).
UNDOCUMENTED_BLUEPRINTS = {"dashboard"}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "param"],
            "properties": {
                "code": {"type": "string", "description": "Stable, for programs: not_found, invalid_request, ..."},
                "message": {"type": "string", "description": "For people: what is wrong and, where it helps, what to do."},
                "param": {"type": ["string", "null"], "description": "The field, query parameter or header at fault."},
            },
        }
    },
}

#: When each error status is answered; an operation lists the ones it can give.
ERRORS = {
    "400": "The request is malformed: a path id, query value, header or form field the document refuses, a body "
           "that is not JSON, a file or archive whose content its reader refuses, or an id (cursor, file, model) "
           "that names nothing of yours that fits.",
    "401": "The API key is missing, malformed or revoked.",
    "404": "Nothing with this id belongs to the key's owner.",
    "409": "The request clashes with the resource's current state (it is in use, already finished, the "
           "Idempotency-Key was used with another body) or with a concurrent change; nothing was changed.",
    "410": "The model's files are no longer stored.",
    "413": "The body is larger than the upload limit (MAX_UPLOAD_BYTES).",
    "415": "The body is not of the media type the operation takes.",
    "422": "The JSON body breaks the job schema, or a rule that depends on another field, on the settings or on the "
           "referenced model or file (n_embd divisible by n_head, warmup_steps within max_steps, a context the "
           "model has, enough tokens in the training file).",
    "503": "The database cannot be reached; nothing was done. Try again shortly.",
    "507": "The server's disk is full; nothing was stored. Try again later.",
}

ID = TypeAdapter(ResourceId).json_schema()
UNIX_TIME = {"type": "integer", "description": "Seconds since the Unix epoch."}
MAYBE_UNIX_TIME = {"type": ["integer", "null"], "description": "Seconds since the Unix epoch, or null."}
MAYBE_ID = {"type": ["string", "null"]}
NAME = {"type": "string", "minLength": 1, "maxLength": NAME_LENGTH, "pattern": NAME_PATTERN}
BINARY = {"type": "string", "format": "binary"}


def obj(properties: dict[str, Any], description: str | None = None, **extra: Any) -> dict[str, Any]:
    """An object schema whose properties are all required (the API always writes every key, null or not)."""
    schema = {"type": "object", "required": list(properties), "properties": properties, **extra}
    if description:
        schema["description"] = description
    return schema


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def page_of(item: str, id_schema: dict[str, Any]) -> dict[str, Any]:
    """A list page of `item`s: first_id and last_id are the page's ends (null when empty); pass last_id as
    `after` for the next page while has_more."""
    maybe_id = {"type": [id_schema["type"], "null"]}
    return obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref(item)},
                "first_id": maybe_id, "last_id": maybe_id, "has_more": {"type": "boolean"}})


def deleted(kind: str) -> dict[str, Any]:
    return obj({"id": {"type": "string"}, "object": {"const": kind}, "deleted": {"const": True}})


#: The objects the API answers with.
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": ERROR_SCHEMA,
    "Health": obj({"status": {"const": "ok"}}),
    "Readiness": obj({"status": {"enum": ["ready", "unavailable"]},
                      "checks": obj({"database": {"enum": ["ok", "unreachable"]},
                                     "broker": {"enum": ["ok", "unreachable"]}})}),
    "File": obj({
        "id": {"type": "string"}, "object": {"const": "file"}, "purpose": {"enum": list(FILE_PURPOSES)},
        "filename": {"type": "string"}, "bytes": {"type": "integer", "minimum": 0},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "records": {"type": "integer", "minimum": 0, "description": "Documents (train, fine-tune), prompts "
                                                                    "(generate), requests (batch) or lines "
                                                                    "(batch_output)."},
        "tokens": {"type": ["integer", "null"], "description": "The exact token count of a training file up to "
                                                               "1 MiB; null otherwise."},
        "created_at": UNIX_TIME,
        "status": {"const": "processed", "description": "OpenAI's: every stored file was read whole and accepted."},
        "status_details": {"type": "null"}}),
    "FileDeleted": deleted("file"),
    "Job": obj({
        "id": {"type": "string"}, "object": {"const": "job"}, "type": {"enum": list(JOB_TYPES)},
        "status": {"enum": list(STATUSES)}, "created_at": UNIX_TIME, "started_at": MAYBE_UNIX_TIME,
        "finished_at": MAYBE_UNIX_TIME, "training_file": MAYBE_ID, "validation_file": MAYBE_ID,
        "input_file": MAYBE_ID, "progress": {"type": "object"}, "result": {"type": ["object", "null"]},
        "error": {"type": ["object", "null"]}, "attempts": {"type": "integer", "minimum": 0},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}}},
        "A job; besides these keys, its type's resolved parameters: model, hyperparameters, devices, seed and "
        "suffix (train, finetune; method for finetune) or model, sampling and prompt_count (generate).",
        additionalProperties=True),
    "Event": obj({"id": {"type": "integer"}, "object": {"const": "job.event"}, "created_at": UNIX_TIME,
                  "level": {"enum": list(EVENT_LEVELS)}, "type": {"enum": list(EVENT_TYPES)},
                  "message": {"type": "string"}, "data": {"type": ["object", "null"]}}),
    "Checkpoint": obj({"id": {"type": "string"}, "object": {"const": "job.checkpoint"},
                       "step": {"type": "integer"}, "train_loss": {"type": ["number", "null"]},
                       "val_loss": {"type": ["number", "null"], "description": "Null unless the step was an "
                                                                               "evaluation step."},
                       "val_perplexity": {"type": ["number", "null"]},
                       "val_accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1, "description":
                                        "The share of validation targets predicted exactly (argmax)."},
                       "created_at": UNIX_TIME, "bytes": {"type": "integer", "minimum": 0}}),
    "Result": obj({"id": {"type": "integer", "description": "The same as index: the cursor for `after`."},
                   "custom_id": {"type": ["string", "null"]}, "index": {"type": "integer", "minimum": 0},
                   "prompt": {"type": "string"}, "completions": {"type": "array", "items": {"type": "object"}},
                   "usage": {"type": ["object", "null"]}, "error": {"type": ["object", "null"]}}),
    "Model": obj({"id": {"type": "string"}, "object": {"const": "model"},
                  "created": {**UNIX_TIME, "description": "OpenAI's name for created_at (the same instant)."},
                  "owned_by": {"type": "string", "description": "The owner of the API key that made or imported it."},
                  "name": {"type": "string"},
                  "source": {"enum": list(MODEL_SOURCES)}, "job_id": MAYBE_ID,
                  "checkpoint_step": {"type": ["integer", "null"], "description": "For source checkpoint: the "
                                                                                  "step of job_id's checkpoint."},
                  "config": {"type": "object", "description": "The checkpoint's config.json."},
                  "parameter_count": {"type": "integer", "minimum": 0}, "created_at": UNIX_TIME}),
    "ModelDeleted": deleted("model"),
    "MetricPoint": obj({
        "step": {"type": "integer", "minimum": 1},
        "train_loss": {"type": ["number", "null"], "description": "The step's training loss (nats per token)."},
        "val_loss": {"type": ["number", "null"], "description": "The validation loss (nats per token) on an "
                                                               "evaluation step; null on the others."},
        "learning_rate": {"type": ["number", "null"]},
        "grad_norm": {"type": ["number", "null"], "description": "Total gradient norm before clipping."},
        "tokens_per_second": {"type": ["number", "null"], "description": "Training tokens per second over the step."},
        "elapsed_seconds": {"type": ["number", "null"], "description": "Seconds from the job's first start to the "
                                                                       "end of the step (a resumed run continues "
                                                                       "the count)."}},
        "One training step; a value that was not finite is null."),
    "MetricList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("MetricPoint")},
                       "has_more": {"type": "boolean", "description": "More steps follow: ask again with `after` "
                                                                         "the last step of `data`."}}),
}
RESPONSE_SCHEMAS.update({"FileList": page_of("File", ID), "JobList": page_of("Job", ID),
                         "ModelList": page_of("Model", ID), "EventList": page_of("Event", {"type": "integer"}),
                         "CheckpointList": page_of("Checkpoint", ID), "ResultList": page_of("Result", {"type": "integer"})})


def query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def multipart(properties: dict[str, Any], required: list[str], description: str) -> dict[str, Any]:
    """A multipart body of these fields only (api.context.check_form_fields refuses any other, with a 400)."""
    return {"required": True, "description": description, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}}


def json_response(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": ref(schema)}}


LIMIT = query("limit", f"Page size, 1 to {MAX_PAGE_SIZE} (default {DEFAULT_PAGE_SIZE}).",
              {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE})
AFTER_ID = query("after", "The last id of the previous page (its last_id); an id that names nothing of yours is "
                          "a 400.", ID)
AFTER_INT = query("after", "The last id of the previous page (its last_id).",
                  {"type": "integer", "minimum": 0, "maximum": MAX_INT_CURSOR})
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {
    "type": "string", "minLength": 1, "maxLength": NAME_LENGTH, "pattern": IDEMPOTENCY_KEY_PATTERN},
    "description": "Printable ASCII. A retry with the same key and body returns the original job; a different "
                   "body is a 409."}
RESULTS_HEADERS = {
    "Job-Status": {"required": True, "description": "The job's status when the results were read.",
                   "schema": {"enum": list(STATUSES)}},
    "Results-Partial": {"required": True, "schema": {"enum": ["true", "false"]}, "description":
                        "true while the job can still add results (queued, running, cancelling): these are the "
                        "results so far, in input order, the prompts not done yet missing; false once it has ended."},
}
FILE_NAME_RULE = (f"The part's file name is required: 1 to {NAME_LENGTH} characters, no control characters or line "
                  "breaks.")

#: What the url_map cannot tell, by endpoint: parameters, request bodies, the success answer, and the error
#: statuses beyond those every operation of its kind can give (see `error_statuses`).
OPERATIONS: dict[str, dict[str, Any]] = {
    "health.healthz": {"content": json_response("Health")},
    "health.readyz": {"content": json_response("Readiness"), "responses": {"503": {
        "description": "The database or the broker is unreachable (checks says which).",
        "content": json_response("Readiness")}}},
    "openapi.openapi_json": {"content": {"application/json": {"schema": {"type": "object"}}}},
    "openapi.docs": {"content": {"text/html": {"schema": {"type": "string"}}}},
    "files.upload_file": {"status": "201", "content": json_response("File"), "errors": ["413", "415", "507"],
                          "requestBody": multipart(
        {"file": {**BINARY, "description": "A train file is UTF-8 text or JSONL with a string `text`, or a string "
                                           "`prompt` and a string `completion` (the prompt is not trained on), on "
                                           "every line; "
                                           "a generate file is JSONL with `custom_id` and `prompt` on every line. "
                                           + FILE_NAME_RULE},
         "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES), "description": "batch_output files are "
                     "written by the platform (a batch's output and error files), never uploaded."}},
        ["file", "purpose"], "The file is read whole with the reader its jobs use; a line it refuses is a 400 "
                             "invalid_file naming the line.")},
    "files.list_files": {"content": json_response("FileList"), "parameters": [
        query("purpose", "Only files with this purpose.", {"type": "string", "enum": list(FILE_PURPOSES)}),
        query("order", "By creation: desc, newest first (the default), or asc, oldest first.",
              {"type": "string", "enum": list(FILE_ORDERS), "default": "desc"}),
        AFTER_ID, LIMIT]},
    "files.get_file": {"content": json_response("File")},
    "files.file_content": {"content": {"application/octet-stream": {"schema": BINARY}}},
    "files.delete_file": {"content": json_response("FileDeleted")},
    "jobs.submit_job": {
        "status": "202", "content": json_response("Job"), "errors": ["413", "415", "422"],
        "headers": {"Location": {"required": True, "description": "The job's URL: /v1/jobs/<id>.",
                                 "schema": {"type": "string"}}},
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref("JobRequest")}}},
        "parameters": [IDEMPOTENCY_KEY],
    },
    "jobs.list_jobs": {"content": json_response("JobList"), "parameters": [
        query("type", "Only jobs of this type.", {"type": "string", "enum": list(JOB_TYPES)}),
        query("status", "Only jobs in this status.", {"type": "string", "enum": list(STATUSES)}),
        AFTER_ID, LIMIT]},
    "jobs.get_job": {"content": json_response("Job")},
    "jobs.cancel_job": {"content": json_response("Job")},
    "jobs.pause_job": {"content": json_response("Job")},
    "jobs.resume_job": {"content": json_response("Job"), "errors": ["415", "422"], "requestBody": {
        "required": False, "content": {"application/json": {"schema": TypeAdapter(ResumeRequest).json_schema()}}}},
    "jobs.register_checkpoint": {
        "status": "201", "content": json_response("Model"), "errors": ["415", "422"],
        "responses": {"200": {"description": "This checkpoint was registered before: its model.",
                              "content": json_response("Model")}},
        "headers": {"Location": {"required": True, "description": "The model's URL: /v1/models/<id>.",
                                 "schema": {"type": "string"}}},
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "properties": {"name": {
                "type": ["string", "null"], "minLength": 1, "maxLength": NAME_LENGTH,
                "allOf": [{"pattern": NAME_PATTERN}, {"pattern": r"\S"}], "description": "Not blank, no control "
                "characters. Default (also null): the job's model name with @step-<step>."}}}}}}},
    "jobs.list_events": {"content": {**json_response("EventList"), "text/event-stream": {"schema": {
        "type": "string", "description": "Sent when the request's Accept prefers text/event-stream: server-sent "
        "events, each job event as `id: <event id>` and `data: <Event>`, oldest first, then new ones as they happen; "
        "`event: job` with `data: <Job>` whenever the job's status or progress changes; `event: end` with the final "
        "Job once the job has finished and all its events were sent, and the stream closes. A stream also ends after "
        "EVENT_STREAM_SECONDS; reconnect with Last-Event-ID to resume. `limit` does not apply."}}},
        "parameters": [AFTER_INT, LIMIT, {
            "name": "Last-Event-ID", "in": "header", "required": False,
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT_CURSOR},
            "description": "Resume after this event id (what EventSource sends on reconnecting); instead of `after`."}],
        "responses": {"503": {"description": "The database is unreachable (database_unavailable), or, for a stream, "
                              "this API process serves its most streams already (too_many_streams; see Retry-After).",
                              "content": json_response("Error")}}},
    "jobs.list_checkpoints": {"content": json_response("CheckpointList")},
    "jobs.list_results": {"content": json_response("ResultList"), "parameters": [AFTER_INT, LIMIT],
                          "headers": RESULTS_HEADERS},
    "jobs.stream_results": {"content": {"application/x-ndjson": {"schema": {
        "type": "string", "description": "One Result object (without id) per line, in input order."}}},
        "headers": RESULTS_HEADERS},
    "models.list_models": {"content": json_response("ModelList"), "parameters": [AFTER_ID, query(
        "limit", f"Page size, 1 to {MAX_PAGE_SIZE}. Default: every model (after `after`) in one answer, as OpenAI's "
                 "models list, which the openai SDK does not page.",
        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE})]},
    "models.get_model": {"content": json_response("Model")},
    "models.delete_model": {"content": json_response("ModelDeleted")},
    "models.import_model": {"status": "201", "content": json_response("Model"), "errors": ["413", "415", "507"],
                            "requestBody": multipart(
        {"file": {**BINARY, "description": "A .tar, .tar.gz/.tgz or .zip of a Hugging Face format GPT-2 checkpoint: "
                                           "config.json and model.safetensors or pytorch_model.bin."},
         "name": {"type": "string", "maxLength": NAME_LENGTH, "pattern": f"^$|{NAME_PATTERN}",
                  "description": "Default (also when empty): the archive's file name without its suffix."}},
        ["file"], "The archive is extracted and checked as from_pretrained would load it; one it refuses is a 400 "
                  "invalid_model naming what is wrong.")},
    "job_metrics.list_metrics": {"content": json_response("MetricList"), "parameters": [
        query("after", "Only steps after this one (the last step a chart already has).",
              {"type": "integer", "minimum": 0, "maximum": MAX_INT_CURSOR}),
        query("limit", f"At most this many steps, 1 to {MAX_METRICS_PAGE_SIZE} (default {MAX_METRICS_PAGE_SIZE}).",
              {"type": "integer", "minimum": 1, "maximum": MAX_METRICS_PAGE_SIZE, "default": MAX_METRICS_PAGE_SIZE})]},
    "job_metrics.metrics_csv": {"content": {"text/csv": {"schema": {
        "type": "string", "description": "A header row `step,train_loss,val_loss,learning_rate,grad_norm,"
        "tokens_per_second,elapsed_seconds`, then one row per MetricPoint, by step; an empty cell is null."}}},
        "parameters": [query("after", "Only steps after this one.",
                             {"type": "integer", "minimum": 0, "maximum": MAX_INT_CURSOR})]},
    "monitoring.metrics": {"content": {"text/plain": {"schema": {
        "type": "string", "description": "The Prometheus text format (version 0.0.4): gpt2jobs_jobs, "
        "gpt2jobs_job_queue_wait_seconds, gpt2jobs_job_duration_seconds, gpt2jobs_tokens_total, "
        "gpt2jobs_lease_takeovers_total, gpt2jobs_database_up, gpt2jobs_http_request_duration_seconds."}}},
        "responses": {"401": {"description": "Only when the server sets METRICS_TOKEN: the request does not carry "
                                             "it as `Authorization: Bearer <token>`.", "content": json_response("Error")}}},
    "models.download_model": {"content": {"application/gzip": {"schema": BINARY}}, "errors": ["410"]},
}


# OpenAI's fine-tuning API over our finetune jobs (api.fine_tuning, jobs.fine_tuning).
OPENAI_HYPERPARAMETERS = obj({name: {"anyOf": [{"type": "number"}, {"const": "auto"}, {"type": "null"}]}
                              for name in ("n_epochs", "batch_size", "learning_rate_multiplier")},
                             '"auto" until the worker resolves it, then the value that ran; batch_size is examples '
                             "per optimizer step.")
RESPONSE_SCHEMAS.update({
    "FineTuningJob": obj({
        "id": {"type": "string"}, "object": {"const": "fine_tuning.job"}, "created_at": UNIX_TIME,
        "finished_at": MAYBE_UNIX_TIME, "model": MAYBE_ID, "fine_tuned_model": {
            "type": ["string", "null"], "description": "The registered model's id, once the job succeeded."},
        "organization_id": {"type": "string"}, "status": {"enum": sorted(set(FINE_TUNING_STATUS.values()))},
        "training_file": MAYBE_ID, "validation_file": MAYBE_ID, "hyperparameters": OPENAI_HYPERPARAMETERS,
        "method": {"type": "object"}, "result_files": {"type": "array", "items": {"type": "string"}},
        "trained_tokens": {"type": ["integer", "null"]}, "seed": {"type": ["integer", "null"]},
        "user_provided_suffix": {"type": ["string", "null"]}, "estimated_finish": MAYBE_UNIX_TIME,
        "integrations": {"type": "array"}, "metadata": {"type": ["object", "null"]},
        "error": {"type": ["object", "null"]}}, "A finetune job in the shape of OpenAI's fine_tuning.job."),
    "FineTuningEvent": obj({"id": {"type": "string"}, "object": {"const": "fine_tuning.job.event"},
                            "created_at": UNIX_TIME, "level": {"enum": ["info", "warn", "error"]},
                            "message": {"type": "string"}, "data": {"type": "object"},
                            "type": {"enum": list(EVENT_TYPES)}}),
    "FineTuningCheckpoint": obj({
        "id": {"type": "string"}, "object": {"const": "fine_tuning.job.checkpoint"}, "created_at": UNIX_TIME,
        "fine_tuning_job_id": {"type": "string"}, "fine_tuned_model_checkpoint": {
            "type": ["string", "null"], "description": "The id of a model made from this checkpoint (registered, "
                                                       "or the job's own), usable in batches; null until one is."},
        "step_number": {"type": "integer"}, "metrics": {"type": "object"}}),
})
RESPONSE_SCHEMAS.update({"FineTuningJobList": page_of("FineTuningJob", ID),
                         "FineTuningEventList": page_of("FineTuningEvent", {"type": "string"}),
                         "FineTuningCheckpointList": page_of("FineTuningCheckpoint", ID)})
OPERATIONS.update({
    "fine_tuning.create_fine_tuning_job": {
        "content": json_response("FineTuningJob"), "errors": ["415", "422"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref("FineTuningJobRequest")}}}},
    "fine_tuning.list_fine_tuning_jobs": {"content": json_response("FineTuningJobList"), "parameters": [
        AFTER_ID, LIMIT, {"name": "metadata", "in": "query", "required": False, "style": "deepObject",
                          "explode": True, "schema": {"type": "object", "additionalProperties": {"type": "string"}},
                          "description": "metadata[key]=value: only jobs whose metadata has these values."}]},
    "fine_tuning.get_fine_tuning_job": {"content": json_response("FineTuningJob")},
    "fine_tuning.cancel_fine_tuning_job": {"content": json_response("FineTuningJob")},
    "fine_tuning.pause_fine_tuning_job": {"content": json_response("FineTuningJob")},
    "fine_tuning.resume_fine_tuning_job": {"content": json_response("FineTuningJob")},
    "fine_tuning.list_fine_tuning_events": {"content": json_response("FineTuningEventList"), "parameters": [
        query("after", "The last event id of the previous page (older events follow).",
              {"type": "string", "pattern": EVENT_CURSOR_PATTERN}), LIMIT]},
    "fine_tuning.list_fine_tuning_checkpoints": {"content": json_response("FineTuningCheckpointList"),
                                                 "parameters": [AFTER_ID, LIMIT]},
})

# OpenAI's Batch API over our generate jobs (api.batches, jobs.batches).
BATCH_ERROR = obj({"code": {"type": ["string", "null"]}, "message": {"type": ["string", "null"]},
                   "param": {"type": ["string", "null"]}, "line": {"type": ["integer", "null"], "description":
                                                                    "The input file's line at fault, if one is."}})
RESPONSE_SCHEMAS.update({
    "Batch": obj({
        "id": {"type": "string"}, "object": {"const": "batch"}, "endpoint": {"type": "string"},
        "errors": {"anyOf": [obj({"object": {"const": "list"}, "data": {"type": "array", "items": BATCH_ERROR}}),
                             {"type": "null"}], "description": "Why the batch failed: every problem of every "
                             "request (then none ran), or its job's error."},
        "input_file_id": {"type": "string"}, "completion_window": {"type": "string"},
        "status": {"enum": ["validating", "in_progress", "finalizing", "cancelling", *BATCH_OUTCOMES]},
        "output_file_id": MAYBE_ID, "error_file_id": MAYBE_ID, "created_at": UNIX_TIME,
        "in_progress_at": MAYBE_UNIX_TIME, "expires_at": UNIX_TIME, "finalizing_at": MAYBE_UNIX_TIME,
        "completed_at": MAYBE_UNIX_TIME, "failed_at": MAYBE_UNIX_TIME, "expired_at": MAYBE_UNIX_TIME,
        "cancelling_at": MAYBE_UNIX_TIME, "cancelled_at": MAYBE_UNIX_TIME,
        "request_counts": obj({"total": {"type": "integer", "minimum": 0}, "completed": {"type": "integer", "minimum": 0},
                               "failed": {"type": "integer", "minimum": 0}}),
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        "model": {"type": ["string", "null"], "description": "The model every request names."},
        "usage": obj({"input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
                      "total_tokens": {"type": "integer"},
                      "input_tokens_details": obj({"cached_tokens": {"type": "integer"}}),
                      "output_tokens_details": obj({"reasoning_tokens": {"type": "integer"}})}),
        "job_id": {**MAYBE_ID, "description": "The generate job that runs the requests (null for a batch refused "
                                              "at creation)."}},
        "OpenAI's batch object. Its output and error files (purpose batch_output) hold one line per request in "
        "OpenAI's batch output format."),
})
RESPONSE_SCHEMAS["BatchList"] = page_of("Batch", ID)
OPERATIONS.update({
    "batches.create_batch": {"content": json_response("Batch"), "errors": ["404", "415", "422"],
                             "requestBody": {"required": True, "content": {"application/json": {
                                 "schema": ref("BatchCreate")}}}},
    "batches.list_batches": {"content": json_response("BatchList"), "parameters": [AFTER_ID, LIMIT]},
    "batches.get_batch": {"content": json_response("Batch")},
    "batches.cancel_batch": {"content": json_response("Batch")},
})


def error_statuses(path: str, method: str, extra: list[str]) -> list[str]:
    """The error statuses an operation can answer: every /v1 route checks the key (401) and its path and query
    values (400) and reaches the database (503); a route with an id can miss (404); a write can clash (409)."""
    if not path.startswith("/v1/"):
        return []
    statuses = {"400", "401", "503", *extra}
    if "{" in path:
        statuses.add("404")
    if method in ("post", "delete"):
        statuses.add("409")
    return sorted(statuses)


def operation(endpoint: str, path: str, method: str, summary: str, path_arguments: list[str]) -> dict[str, Any]:
    extra = OPERATIONS[endpoint]
    success: dict[str, Any] = {"description": "Success", "content": extra["content"]}
    if "headers" in extra:
        success["headers"] = extra["headers"]
    responses: dict[str, Any] = {extra.get("status", "200"): success, **extra.get("responses", {})}
    for status in error_statuses(path, method, extra.get("errors", [])):
        responses.setdefault(status, {"description": ERRORS[status], "content": json_response("Error")})
    spec: dict[str, Any] = {
        "operationId": f"{endpoint}.{method}",
        "summary": summary,
        "parameters": [{"name": arg, "in": "path", "required": True, "schema": ID} for arg in path_arguments]
        + extra.get("parameters", []),
        "responses": responses,
    }
    if "requestBody" in extra:
        spec["requestBody"] = extra["requestBody"]
    return spec


def job_request_schemas(max_inline_prompts: int) -> dict[str, Any]:
    """JobRequest and the schemas it refers to, from jobs.specs, with the limits the server's settings add: a
    generate job's inline `prompts` hold at most MAX_INLINE_PROMPTS."""
    job_request = TypeAdapter(JobRequest).json_schema(ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = job_request.pop("$defs", {})
    schemas["JobRequest"] = job_request
    prompts = schemas["GenerateSpec"]["properties"]["prompts"]
    for choice in prompts.get("anyOf", [prompts]):
        if choice.get("type") == "array":
            choice["maxItems"] = max_inline_prompts
    return schemas


def document() -> dict[str, Any]:
    components: dict[str, Any] = dict(RESPONSE_SCHEMAS)
    components.update(job_request_schemas(current_app.extensions["gpt2jobs"].settings.max_inline_prompts))
    fine_tuning_request = TypeAdapter(FineTuningJobRequest).json_schema(ref_template="#/components/schemas/{model}")
    components.update(fine_tuning_request.pop("$defs", {}))
    components["FineTuningJobRequest"] = fine_tuning_request
    components["BatchCreate"] = TypeAdapter(BatchCreate).json_schema(ref_template="#/components/schemas/{model}")
    paths: dict[str, Any] = {}
    for rule in current_app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.partition(".")[0] in UNDOCUMENTED_BLUEPRINTS:
            continue
        view = current_app.view_functions[rule.endpoint]
        path = rule.rule.replace("<", "{").replace(">", "}")
        summary = (view.__doc__ or rule.endpoint).strip().splitlines()[0]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            spec = operation(rule.endpoint, path, method.lower(), summary, sorted(rule.arguments))
            if not rule.rule.startswith("/v1/"):
                spec["security"] = []
            paths.setdefault(path, {})[method.lower()] = spec
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpt2-jobs", "version": "1", "description": "Train, fine-tune and bulk-generate with GPT-2."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@openapi.get("/openapi.json")
def openapi_json():
    """The OpenAPI 3 document."""
    return jsonify(document())


@openapi.get("/docs")
def docs():
    """A rendered API reference."""
    spec = document()
    rows = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op['summary'])}</td></tr>"
            )
    schemas = "".join(
        f"<h3 id='{html.escape(name)}'>{html.escape(name)}</h3><pre>{html.escape(_describe(schema))}</pre>"
        for name, schema in spec["components"]["schemas"].items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>gpt2-jobs API</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto}"
        "td{padding:.2rem .8rem;border-bottom:1px solid #ddd}pre{background:#f6f6f6;padding:.6rem}</style>"
        "</head><body><h1>gpt2-jobs API</h1><p>Authenticate with <code>Authorization: Bearer &lt;key&gt;</code>. "
        "Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>"
        f"<h2>Routes</h2><table>{''.join(rows)}</table><h2>Schemas</h2>{schemas}</body></html>"
    )
    return page, 200, {"Content-Type": "text/html; charset=utf-8"}


def _describe(schema: dict[str, Any]) -> str:
    lines = []
    for name, prop in schema.get("properties", {}).items():
        required = "required" if name in schema.get("required", []) else "optional"
        kind = prop.get("type") or prop.get("$ref", "").rsplit("/", 1)[-1] or "any"
        extra = f" default {prop['default']!r}" if "default" in prop else ""
        lines.append(f"{name}: {kind} ({required}){extra}. {prop.get('description', '')}".rstrip(". ") )
    return "\n".join(lines) or schema.get("description", "")
