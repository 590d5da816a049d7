"""client.jobs: /v1/jobs, with their events, checkpoints and generation results."""
from __future__ import annotations

import builtins
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ._http import Transport
from .types import Checkpoint, Event, GenerationResult, Job


class Jobs:
    def __init__(self, transport: Transport):
        self._t = transport

    def create(self, body: Mapping[str, Any] | None = None, *, idempotency_key: str | None = None,
               **fields: Any) -> Job:
        """Submit a job: `body` and/or keyword fields (`type=`, `training_file=`, `model=`, `hyperparameters=`,
        `prompts=`, `sampling=`, ...) as POST /v1/jobs takes them. An Idempotency-Key is generated for the call
        (unless given) and sent with each of its retries, so a retry never submits the job twice."""
        payload = {**(body or {}), **fields}
        key = idempotency_key if idempotency_key is not None else f"gpt2jobs-client-{uuid.uuid4().hex}"
        return Job.from_api(self._t.json("POST", "/v1/jobs", json=payload, headers={"Idempotency-Key": key}))

    def list(self, type: str | None = None, status: str | None = None, page_size: int | None = None) -> Iterator[Job]:
        """Every job (optionally of one type and status), newest first, fetched page by page as the iteration
        goes."""
        for item in self._t.pages("/v1/jobs", {"type": type, "status": status, "limit": page_size}):
            yield Job.from_api(item)

    def get(self, job_id: str) -> Job:
        return Job.from_api(self._t.json("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        """Cancel: a queued job is cancelled at once, a running one becomes `cancelling`; ConflictError once
        finished."""
        return Job.from_api(self._t.json("POST", f"/v1/jobs/{job_id}/cancel"))

    def events(self, job_id: str, follow: bool = False, poll_interval: float = 1.0) -> Iterator[Event]:
        """The job's events, oldest first. With follow=True, keeps polling for new ones (after the last id seen)
        until the job has finished and no event is left to read."""
        after: int | None = None
        while True:
            # Read the status before the events: every event of a job seen finished here is in the read below.
            finished = follow and self.get(job_id).is_terminal
            seen = False
            for item in self._t.pages(f"/v1/jobs/{job_id}/events", {"after": after, "limit": 100}):
                event = Event.from_api(item)
                after, seen = event.id, True
                yield event
            if not follow or (finished and not seen):
                return
            if not seen:
                time.sleep(poll_interval)

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        """The job's checkpoints, by step."""
        return [Checkpoint.from_api(item) for item in self._t.pages(f"/v1/jobs/{job_id}/checkpoints")]

    def results(self, job_id: str) -> Iterator[GenerationResult]:
        """A generate job's results in input order, streamed from results.jsonl line by line."""
        with self._t.send("GET", f"/v1/jobs/{job_id}/results.jsonl", stream=True) as response:
            for line in response.iter_lines():
                if line.strip():
                    yield GenerationResult.from_api(json.loads(line))

    def wait(self, job_id: str, on_progress: Callable[[Job], Any] | None = None, poll_interval: float = 1.0,
             timeout: float | None = None) -> Job:
        """Poll until the job has finished and return it (failed and cancelled jobs too: see its `status` and
        `error`). `on_progress(job)` is called with the first snapshot and each one that differs from the last.
        TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            job = self.get(job_id)
            if on_progress is not None and job.raw != last:
                on_progress(job)
            last = job.raw
            if job.is_terminal:
                return job
            if deadline is not None and time.monotonic() + poll_interval > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll_interval)
