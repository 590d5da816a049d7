"""client.jobs: /v1/jobs, with their events, checkpoints and generation results."""
from __future__ import annotations

import builtins
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx

from . import sse
from ._http import Transport
from .errors import ServiceUnavailableError
from .sse import MEDIA_TYPE
from .types import Checkpoint, Event, GenerationResult, Job


#: The largest event id (a 32-bit column): resuming after it skips every event, for callers that want progress only.
MAX_EVENT_ID = 2**31 - 1


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
        """The job's events, oldest first. With follow=True, new ones as they happen (the live event stream,
        `stream()`), until the job has finished and its last event was read."""
        if not follow:
            for item in self._t.pages(f"/v1/jobs/{job_id}/events", {"limit": 100}):
                yield Event.from_api(item)
            return
        for followed in self.stream(job_id, poll_interval=poll_interval):
            if isinstance(followed, Event):
                yield followed

    def stream(self, job_id: str, after: int | None = None, poll_interval: float = 1.0) -> Iterator[Event | Job]:
        """The job as it runs: its events (oldest first, after the event id `after`) and a Job snapshot whenever
        its status or progress changes; the last item is the finished Job. Reads the API's server-sent events
        (GET /v1/jobs/{id}/events with Accept: text/event-stream), reconnecting with Last-Event-ID when a stream
        ends before the job (the server bounds each connection's time) or drops; where the API serves no stream
        (too many watchers: 503 too_many_streams after the retries), it polls the JSON routes instead."""
        last_id = after
        failures = 0
        while True:
            headers = {"Accept": MEDIA_TYPE}
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                with self._t.send("GET", f"/v1/jobs/{job_id}/events", headers=headers, stream=True) as response:
                    if not response.headers.get("content-type", "").startswith(MEDIA_TYPE):
                        break  # an API without streams: poll
                    for message in sse.parse(response.iter_lines()):
                        failures = 0
                        if message.event == "message":
                            event = Event.from_api(json.loads(message.data))
                            last_id = event.id
                            yield event
                        elif message.event == "job":
                            yield Job.from_api(json.loads(message.data))
                        elif message.event == "end":
                            yield Job.from_api(json.loads(message.data))
                            return
            except ServiceUnavailableError as exc:
                if exc.code != "too_many_streams":
                    raise
                break
            except (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError):
                failures += 1  # the connection dropped mid-stream: reconnect, resuming after the last event
                if failures > self._t.max_retries:
                    raise
                time.sleep(self._t.delay(failures, None))
        yield from self._poll(job_id, last_id, poll_interval)

    def _poll(self, job_id: str, after: int | None, poll_interval: float) -> Iterator[Event | Job]:
        """stream() by polling the JSON routes."""
        last: dict[str, Any] | None = None
        while True:
            # The status before the events: every event of a job seen finished here is in the read below.
            job = self.get(job_id)
            seen = False
            for item in self._t.pages(f"/v1/jobs/{job_id}/events", {"after": after, "limit": 100}):
                event = Event.from_api(item)
                after, seen = event.id, True
                yield event
            if last is None or (job.status, job.progress) != (last["status"], last["progress"]):
                yield job
                last = job.raw
            if job.is_terminal:
                return
            if not seen:
                time.sleep(poll_interval)

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        """The job's checkpoints, by step."""
        return [Checkpoint.from_api(item) for item in self._t.pages(f"/v1/jobs/{job_id}/checkpoints")]

    def results(self, job_id: str) -> Iterator[GenerationResult]:
        """A generate job's results in input order, streamed from results.jsonl line by line. While the job runs
        these are the results so far (the prompts not done yet are missing; the API says Results-Partial)."""
        with self._t.send("GET", f"/v1/jobs/{job_id}/results.jsonl", stream=True) as response:
            for line in response.iter_lines():
                if line.strip():
                    yield GenerationResult.from_api(json.loads(line))

    def wait(self, job_id: str, on_progress: Callable[[Job], Any] | None = None, poll_interval: float = 1.0,
             timeout: float | None = None) -> Job:
        """Follow the job until it has finished and return it (failed and cancelled jobs too: see its `status`
        and `error`). `on_progress(job)` is called with the first snapshot and each change of status or progress
        (from the live event stream; by polling every `poll_interval` seconds where there is none, or with a
        `timeout`). TimeoutError after `timeout` seconds."""
        if timeout is None:
            for item in self.stream(job_id, after=MAX_EVENT_ID, poll_interval=poll_interval):
                if isinstance(item, Job):
                    if on_progress is not None:
                        on_progress(item)
                    if item.is_terminal:
                        return item
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
