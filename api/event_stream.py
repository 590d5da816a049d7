"""A job's events as a live stream: GET /v1/jobs/{id}/events with `Accept: text/event-stream`.

Server-sent events (https://html.spec.whatwg.org/multipage/server-sent-events.html), one message per:

* job event, oldest first: `id: <event id>` and `data: <the event object of the JSON list>`;
* change of the job's status or progress: `event: job` and `data: <the job object>` (no id, so a reconnect's
  Last-Event-ID stays the last job event's);
* the end: once the job has finished and every event up to its terminal one was sent, `event: end` and
  `data: <the final job object>`, and the server closes the stream.

A reconnect sends `Last-Event-ID` (browsers' EventSource does it by itself; `?after=` works too) and the stream
resumes after that event. Keep-alive comments (`: keep-alive`) go out every KEEPALIVE_SECONDS when nothing else
does, which is also how a gone client is noticed.

Bounds, so watchers cannot take the API: a stream holds one thread of its gunicorn process (gthread workers:
gunicorn.conf.py), each process serves at most EVENT_STREAMS streams (one more is a 503 `too_many_streams` with
Retry-After, and gunicorn.conf.py keeps threads beyond those for plain requests), and a stream ends after
EVENT_STREAM_SECONDS without `event: end`; the client reconnects with Last-Event-ID and misses nothing. A stream
whose API key is revoked ends within KEY_CHECK_SECONDS (its reconnect is a 401).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, request
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from jobs import repository
from jobs.db import session_scope
from jobs.errors import NotFound
from jobs.models import Job, JobEvent
from jobs.repository import MAX_PAGE_SIZE
from jobs.states import TERMINAL

from .context import MAX_INT_CURSOR, owner, platform, query_integer
from .errors import ApiError

MEDIA_TYPE = "text/event-stream"
POLL_SECONDS = 1.0  # how often a stream looks for new events and progress
KEEPALIVE_SECONDS = 15.0
RECONNECT_MILLISECONDS = 2000  # the `retry:` a stream announces to EventSource clients
EVENTS_PER_READ = MAX_PAGE_SIZE
RETRY_AFTER_SECONDS = 5  # a refused stream's Retry-After
KEY_CHECK_SECONDS = 10.0  # how often a stream checks that its API key is still valid (a revoked one ends it)


def wants_event_stream() -> bool:
    """Whether the request asks for the live stream: `text/event-stream` preferred over JSON in its Accept."""
    return request.accept_mimetypes.best_match(["application/json", MEDIA_TYPE]) == MEDIA_TYPE


class KeyRevoked(Exception):
    """The stream's API key was revoked while it ran."""


class StreamSlots:
    """The streams one API process may serve at once (EVENT_STREAMS): a non-blocking semaphore."""

    def __init__(self, size: int):
        self.size = size
        self._free = threading.BoundedSemaphore(size)

    def take(self) -> Callable[[], None]:
        """A slot, or ApiError 503; returns the release function (safe to call more than once)."""
        if not self._free.acquire(blocking=False):
            raise ApiError(503, "too_many_streams", f"This API process already serves {self.size} live event "
                           "streams; try again shortly, or read the events as JSON (GET without Accept: "
                           "text/event-stream).", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._free.release()

        return release


def message(data: dict[str, Any], event: str | None = None, id: int | None = None) -> str:
    """One SSE message. JSON has no raw line breaks, so `data` is one line; keys sorted, as the JSON routes'."""
    head = (f"id: {id}\n" if id is not None else "") + (f"event: {event}\n" if event is not None else "")
    return f"{head}data: {json.dumps(data, ensure_ascii=False, sort_keys=True)}\n\n"


def changed(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether a job object differs in what watchers follow: its status or progress."""
    return (before["status"], before["progress"]) != (after["status"], after["progress"])


def last_event_id() -> int | None:
    """Where to resume: the Last-Event-ID header, else `after`; 400 for anything but an event id."""
    header = request.headers.get("Last-Event-ID")
    if header is not None:
        return query_integer("Last-Event-ID", header, 0, MAX_INT_CURSOR)
    after = request.args.get("after")
    return None if after is None else query_integer("after", after, 0, MAX_INT_CURSOR)


def event_stream_response(job_id: str, job_object: Callable[[Job], dict[str, Any]],
                          event_object: Callable[[JobEvent], dict[str, Any]]) -> Response:
    """The stream for one of the caller's jobs (404 before any byte if it is not theirs)."""
    after = last_event_id()
    caller, settings = owner(), platform().settings
    secret = request.headers["Authorization"].partition(" ")[2].strip()  # checked by require_api_key
    sessions: sessionmaker[Session] = platform().sessions
    with session_scope(sessions) as session:
        repository.get_job(session, caller, job_id)
    release = platform().stream_slots.take()

    def poll(after: int | None, check_key: bool) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
        # The job before its events: a job seen finished here had its terminal event committed with that
        # status, so the read below includes it.
        with session_scope(sessions) as session:
            if check_key and repository.authenticate(session, secret) != caller:
                raise KeyRevoked
            job = repository.get_job(session, caller, job_id)
            shown, finished = job_object(job), job.status in TERMINAL
            events, _ = repository.list_events(session, caller, job_id, after=after, limit=EVENTS_PER_READ)
            return shown, [event_object(event) for event in events], finished

    def messages() -> Iterator[str]:
        nonlocal after
        try:
            yield f"retry: {RECONNECT_MILLISECONDS}\n\n"
            closes_at = time.monotonic() + settings.event_stream_seconds
            last_sent = key_checked = time.monotonic()
            last_job: dict[str, Any] | None = None
            while time.monotonic() < closes_at:
                check_key = time.monotonic() - key_checked >= KEY_CHECK_SECONDS
                try:
                    shown, events, finished = poll(after, check_key)
                except (NotFound, KeyRevoked):
                    return  # deleted meanwhile, or the key was revoked: a reconnect gets the 404 or 401
                except OperationalError:
                    time.sleep(POLL_SECONDS)  # the database is away: wait for it
                    continue
                if check_key:
                    key_checked = time.monotonic()
                sent = bool(events)
                for event in events:
                    after = event["id"]
                    yield message(event, id=event["id"])
                if shown is not None and (last_job is None or changed(last_job, shown)):
                    yield message(shown, event="job")
                    last_job, sent = shown, True
                if finished and len(events) < EVENTS_PER_READ:
                    yield message(shown, event="end")
                    return
                if sent:
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
                    yield ": keep-alive\n\n"
                    last_sent = time.monotonic()
                if len(events) < EVENTS_PER_READ:
                    time.sleep(POLL_SECONDS)
        finally:
            release()

    response = Response(messages(), mimetype=MEDIA_TYPE)
    response.call_on_close(release)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each message on as it comes
    return response
