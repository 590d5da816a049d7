"""A Python client for the gpt2-jobs REST API (httpx and the standard library only: no torch, no server code).

    from gpt2jobs_client import Client

    client = Client()  # $GPT2JOBS_API_URL, $GPT2JOBS_API_KEY
    job = client.jobs.create(type="generate", model="model-...", prompts=["Hello"])
    job = client.jobs.wait(job.id)
    for result in client.jobs.results(job.id):
        print(result.index, result.texts)
"""
from .client import Client
from .errors import (APIConnectionError, APIError, AuthenticationError, BadRequestError, ConflictError, GPT2JobsError,
                     NotFoundError, ServiceUnavailableError, UnprocessableEntityError)
from .types import SETTLED_STATUSES, TERMINAL_STATUSES, Checkpoint, Deleted, Event, File, GenerationResult, Job, Model

__all__ = [
    "Client", "APIError", "APIConnectionError", "AuthenticationError", "BadRequestError", "ConflictError",
    "GPT2JobsError", "NotFoundError", "ServiceUnavailableError", "UnprocessableEntityError", "TERMINAL_STATUSES",
    "SETTLED_STATUSES", "Checkpoint", "Deleted", "Event", "File", "GenerationResult", "Job", "Model",
]
