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
from .errors import APIConnectionError, ServiceUnavailableError
from .sse import MEDIA_TYPE
from .types import Checkpoint, Event, GenerationResult, Job, Model


#: The largest event id (a 32-bit column): resuming after it skips every event, for callers that want progress only.
MAX_EVENT_ID = 2**31 - 1


#: Seconds a follower (stream, events(follow=True), wait) keeps trying while the API gives no answer.
RECONNECT_PATIENCE = 600.0
MAX_RECONNECT_DELAY = 5.0


class _Outage:
    """A follower's patience with an API that does not answer: wait() sleeps with backoff, and re-raises once
    `patience` seconds have passed since the last answer (over())."""

    def __init__(self, patience: float, transport: Transport):
        self.patience, self.transport = patience, transport
        self.since: float | None = None
        self.tries = 0

    def over(self) -> None:
        self.since, self.tries = None, 0

    def wait(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if now - self.since > self.patience:
            raise exc
        self.tries += 1
        time.sleep(min(self.transport.delay(self.tries, None), MAX_RECONNECT_DELAY))


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

    def pause(self, job_id: str) -> Job:
        """Pause: a queued job is paused at once; a running one becomes `pausing` until its worker has written a
        checkpoint (training) or stored the generation shards in progress, then `paused`. A pausing or paused job
        is returned unchanged; ConflictError when it is cancelling or has finished."""
        return Job.from_api(self._t.json("POST", f"/v1/jobs/{job_id}/pause"))

    def resume(self, job_id: str, devices: int | None = None) -> Job:
        """Resume a paused job: it is queued again and continues from its checkpoint (training) or with the
        prompts not done yet (generation); `devices`: a training job continues on that many devices (the same
        global batch; UnprocessableEntityError when it does not split across them). ConflictError unless it is paused
        (a pausing job too: resume it once it is paused)."""
        body = {"json": {"devices": devices}} if devices is not None else {}
        return Job.from_api(self._t.json("POST", f"/v1/jobs/{job_id}/resume", **body))

    def events(self, job_id: str, follow: bool = False, poll_interval: float = 1.0,
               stop_on_pause: bool = True) -> Iterator[Event]:
        """The job's events, oldest first. With follow=True, new ones as they happen (the live event stream,
        `stream()`), until the job has finished and its last event was read, or (unless stop_on_pause=False)
        until it is paused."""
        if not follow:
            for item in self._t.pages(f"/v1/jobs/{job_id}/events", {"limit": 100}):
                yield Event.from_api(item)
            return
        for followed in self.stream(job_id, poll_interval=poll_interval, stop_on_pause=stop_on_pause):
            if isinstance(followed, Event):
                yield followed

    def stream(self, job_id: str, after: int | None = None, poll_interval: float = 1.0,
               reconnect_patience: float = RECONNECT_PATIENCE, stop_on_pause: bool = True) -> Iterator[Event | Job]:
        """The job as it runs: its events (oldest first, after the event id `after`) and a Job snapshot whenever
        its status or progress changes; the last item is the finished Job, or the paused one: a paused job does
        not change until someone resumes or cancels it, so the stream ends there too (its events up to the pause
        were yielded first), unless stop_on_pause=False, which follows it on through a resume to its end. Reads
        the API's server-sent events (GET /v1/jobs/{id}/events with Accept: text/event-stream), reconnecting with
        Last-Event-ID when a stream ends before the job (the server bounds each connection's time) or drops.
        While the API cannot be reached
        (restarting, its database away: 503), it keeps trying, with backoff, for up to `reconnect_patience`
        seconds without an answer (then APIConnectionError or ServiceUnavailableError). Where the API serves no
        stream (this API process has its most watchers: 503 too_many_streams), it polls the JSON routes."""
        outage = _Outage(reconnect_patience, self._t)
        last_id = after
        paused: Job | None = None
        while True:
            headers = {"Accept": MEDIA_TYPE}
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                with self._t.send("GET", f"/v1/jobs/{job_id}/events", headers=headers, stream=True,
                                  retry_unavailable=False) as response:
                    outage.over()
                    if not response.headers.get("content-type", "").startswith(MEDIA_TYPE):
                        break  # an API without streams: poll
                    for message in sse.parse(response.iter_lines()):
                        if message.event == "message":
                            event = Event.from_api(json.loads(message.data))
                            last_id = event.id
                            yield event
                        elif message.event == "job":
                            job = Job.from_api(json.loads(message.data))
                            if stop_on_pause and job.is_paused:
                                paused = job
                                break
                            yield job
                        elif message.event == "end":
                            yield Job.from_api(json.loads(message.data))
                            return
            except ServiceUnavailableError as exc:
                if exc.code == "too_many_streams":
                    break
                outage.wait(exc)
            except (APIConnectionError, httpx.TransportError) as exc:
                outage.wait(exc)  # the API is away, or the connection dropped mid-stream: resume after last_id
            if paused is not None:
                # The server sends at most a page of events per read, so some up to the pause may not have come
                # yet: read them from the JSON route (a paused job adds none), then the paused job, last.
                for item in self._t.pages(f"/v1/jobs/{job_id}/events", {"after": last_id, "limit": 100}):
                    yield Event.from_api(item)
                yield paused
                return
        yield from self._poll(job_id, last_id, poll_interval, outage, stop_on_pause)

    def _poll(self, job_id: str, after: int | None, poll_interval: float, outage: _Outage,
              stop_on_pause: bool = True) -> Iterator[Event | Job]:
        """stream() by polling the JSON routes."""
        last: dict[str, Any] | None = None
        while True:
            try:
                # The status before the events: every event of a job seen finished (or paused) here is in the read
                # below.
                job = self.get(job_id)
                seen = False
                for item in self._t.pages(f"/v1/jobs/{job_id}/events", {"after": after, "limit": 100}):
                    event = Event.from_api(item)
                    after, seen = event.id, True
                    yield event
            except (ServiceUnavailableError, APIConnectionError) as exc:
                outage.wait(exc)
                continue
            outage.over()
            if last is None or (job.status, job.progress) != (last["status"], last["progress"]):
                yield job
                last = job.raw
            if job.is_terminal or (stop_on_pause and job.is_paused):
                return
            if not seen:
                time.sleep(poll_interval)

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        """The job's checkpoints, by step (with their training loss and, for evaluation steps, the validation
        loss, perplexity and token accuracy)."""
        return [Checkpoint.from_api(item) for item in self._t.pages(f"/v1/jobs/{job_id}/checkpoints")]

    def register_checkpoint(self, job_id: str, checkpoint_id: str, name: str | None = None) -> Model:
        """Register one of the job's checkpoints as a model that generate and finetune jobs can use: in any status
        of the job (running, paused, failed, finished). `name` defaults, on the server, to the job's model name
        with "@step-<step>". Registering the same checkpoint again returns the model it made the first time.
        ConflictError (code checkpoint_gone) when checkpoint retention has removed its files."""
        body = {"name": name} if name is not None else None
        return Model.from_api(self._t.json("POST", f"/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/model", json=body))

    def results(self, job_id: str) -> Iterator[GenerationResult]:
        """A generate job's results in input order, streamed from results.jsonl line by line. While the job runs
        these are the results so far (the prompts not done yet are missing; the API says Results-Partial)."""
        with self._t.send("GET", f"/v1/jobs/{job_id}/results.jsonl", stream=True) as response:
            for line in response.iter_lines():
                if line.strip():
                    yield GenerationResult.from_api(json.loads(line))

    def wait(self, job_id: str, on_progress: Callable[[Job], Any] | None = None, poll_interval: float = 1.0,
             timeout: float | None = None, stop_on_pause: bool = True) -> Job:
        """Follow the job until it has finished and return it (failed and cancelled jobs too: see its `status`
        and `error`), or until it is paused: a paused job waits for someone to resume it, so it is returned too
        (`job.is_paused`; `resume` it, then wait again). With stop_on_pause=False, waits through pauses until it
        has finished. `on_progress(job)` is called with the first snapshot and each change of status or progress
        (from the live event stream; by polling every `poll_interval` seconds where there is none, or with a
        `timeout`). TimeoutError after `timeout` seconds."""
        def done(job: Job) -> bool:
            return job.is_settled if stop_on_pause else job.is_terminal

        if timeout is None:
            for item in self.stream(job_id, after=MAX_EVENT_ID, poll_interval=poll_interval,
                                    stop_on_pause=stop_on_pause):
                if isinstance(item, Job):
                    if on_progress is not None:
                        on_progress(item)
                    if done(item):
                        return item
        deadline = None if timeout is None else time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            job = self.get(job_id)
            if on_progress is not None and job.raw != last:
                on_progress(job)
            last = job.raw
            if done(job):
                return job
            if deadline is not None and time.monotonic() + poll_interval > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll_interval)
