"""What a worker process shares across tasks (settings, database, artifacts, its identity), the lease keeper
that proves it still owns its work, and how a failure becomes an error a user can act on."""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Celery
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_engine, make_session_factory, session_scope
from jobs.errors import BrokerUnavailable, new_reference
from jobs.execution import LeaseLost
from jobs.queue import make_celery
from jobs.settings import Settings
from jobs.states import CANCELLING, PAUSING
from jobs.storage import ArtifactStore, disk_full_error

log = logging.getLogger("workers")
T = TypeVar("T")

#: Set when this worker process is asked to stop (a warm shutdown: SIGTERM to the worker, a deploy): running
#: training writes a checkpoint and hands its job back, generation gives its shard back (workers.app sets it).
SHUTTING_DOWN = threading.Event()

#: How long a worker holding a job waits for an unreachable database before it gives the job up.
OUTAGE_PATIENCE_SECONDS = 3600.0

#: Ids of the jobs this process is running now (claim_job's resume_own: a job not among them whose lease this
#: process still holds is left over from a delivery that an infrastructure error interrupted).
ACTIVE_JOBS: set[str] = set()


def is_infrastructure_error(exc: BaseException) -> bool:
    """Whether `exc` says the database or the broker could not be reached (or dropped the connection), rather
    than anything about the job: such an error never fails a job; the job is retried."""
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError, PoolTimeout, BrokerUnavailable,
                        ConnectionError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout

    return isinstance(exc, (BrokerError, RedisConnectionError, RedisTimeout))


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    artifacts: ArtifactStore
    celery: Celery
    worker_id: str

    def transaction(self):
        """One unit of work: `with rt.transaction() as session: ...` commits on success."""
        return session_scope(self.sessions)

    def persist(self, unit: Callable[[Session], T], patience: float = OUTAGE_PATIENCE_SECONDS) -> T:
        """Run `unit` in a transaction, retrying with backoff (up to 10 s apart) while the database cannot be
        reached, for up to `patience` seconds; then the last error is raised. A worker holding a job rides out a
        database outage this way instead of giving the job up: its LeaseKeeper renews the lease as soon as the
        database answers, before any sweeper judges it (they wait a lease after an outage: workers.sweeper)."""
        deadline = time.monotonic() + patience
        pause = 0.5
        while True:
            try:
                with self.transaction() as session:
                    return unit(session)
            except Exception as exc:
                if not is_infrastructure_error(exc) or time.monotonic() + pause > deadline:
                    raise
                log.warning("database unreachable (%s); retrying in %.1f s", type(exc).__name__, pause)
                time.sleep(pause)
                pause = min(pause * 2, 10.0)


_runtime: Runtime | None = None
_runtime_pid: int | None = None


def runtime() -> Runtime:
    """This process's Runtime, made on first use (after a fork, anew: connections are never shared)."""
    global _runtime, _runtime_pid
    if _runtime is None or _runtime_pid != os.getpid():
        settings = Settings.from_env()
        _runtime = Runtime(
            settings=settings,
            sessions=make_session_factory(make_engine(settings.database_url)),
            artifacts=ArtifactStore(settings.artifact_dir),
            celery=make_celery(settings),
            worker_id=f"{socket.gethostname()}:{os.getpid()}",
        )
        _runtime_pid = os.getpid()
    return _runtime


class LeaseKeeper:
    """Renews a lease on a thread every third of its length while work runs, and remembers what the renewals
    said: the job is being cancelled, or the lease went to another worker (then this one must stop writing).

    `renew(session) -> job status` is one renewal; it raises jobs.execution.LeaseLost when the lease is gone.
    Call `observe(status)` with any status the work reads itself, and `check()` to renew right now.
    """

    def __init__(self, rt: Runtime, renew: Callable[[Session], str], what: str):
        self.rt = rt
        self.renew = renew
        self.what = what
        self.cancelling = False
        self.pausing = False
        self.lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"lease {what}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def should_stop(self) -> bool:
        """Stop working on it: it is being cancelled or paused, another worker has it, or this worker is shutting
        down."""
        return self.cancelling or self.pausing or self.lost or SHUTTING_DOWN.is_set()

    def observe(self, status: str) -> None:
        if status == CANCELLING and not self.cancelling:
            log.info("%s: cancellation requested", self.what)
            self.cancelling = True
        if status == PAUSING and not self.pausing:
            log.info("%s: pause requested", self.what)
            self.pausing = True

    def check(self) -> None:
        with self._lock:
            if self.lost:
                return
            try:
                with self.rt.transaction() as session:
                    status = self.renew(session)
            except LeaseLost:
                log.warning("%s: lease lost to another worker; stopping without writing more", self.what)
                self.lost = True
                return
        self.observe(status)

    def _run(self) -> None:
        interval = max(self.rt.settings.job_lease_seconds / 3, 0.5)
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception as exc:  # a database hiccup: the next renewal tries again before the lease runs out
                if is_infrastructure_error(exc):
                    log.warning("%s: lease renewal failed (%s); trying again", self.what, type(exc).__name__)
                else:
                    log.exception("%s: lease renewal failed", self.what)


class JobFailure(Exception):
    """A failure with an error code a user can act on (the job ends failed with this error). `reference`: the id
    under which an internal error was logged (by a training process of a job on several devices)."""

    def __init__(self, code: str, message: str, param: str | None = None, reference: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.reference = code, message, param, reference


#: An absolute path of two or more parts, but not an API route (/v1/...), which a message may name on purpose.
SERVER_PATH = re.compile(r"(?<![\w/])(?!/v1/)(?:/[\w.@+=-]+){2,}/?")


def user_message(text: str, paths: dict[str, str] | None = None) -> str:
    """`text` without server paths: a known path becomes what the user knows it as, any other absolute path
    "<server path>"."""
    for path, name in sorted((paths or {}).items(), key=lambda item: -len(item[0])):
        text = re.sub(re.escape(path) + r":(\d+): ", lambda m, name=name: f"{name}: line {m.group(1)}: ", text)
        text = text.replace(f"{path}: ", f"{name}: ").replace(path, name)
    return SERVER_PATH.sub("<server path>", text)


def error_for(exc: BaseException, job_id: str, paths: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's `error` for an exception: a stable code, a message of the user's own (no SQL, traceback or
    server path) and the parameter it is about. Every failure is logged with its traceback; an internal error's
    message names a reference id that the log line carries too."""
    from gpt2core import CheckpointError, DatasetError

    if isinstance(exc, JobFailure):
        error = {"code": exc.code, "message": user_message(exc.message, paths), "param": exc.param}
        if exc.reference is not None:
            error["reference"] = exc.reference
    elif disk_full_error(exc) is not None:  # what the job was writing is named where it is known (JobFailure)
        error = {"code": "disk_full", "message": "The server's disk is full, so the job could not write its data. The "
                 "operators must free disk space before the job is submitted again.", "param": None}
    elif isinstance(exc, DatasetError):
        error = {"code": "invalid_file", "message": user_message(str(exc), paths), "param": "training_file"}
    elif isinstance(exc, CheckpointError):
        error = {"code": "invalid_model", "message": user_message(str(exc), paths), "param": "model"}
    elif isinstance(exc, FloatingPointError):  # gpt2core.Trainer: the loss became NaN or infinite
        error = {"code": "training_diverged", "message": f"Training diverged: {exc}. Try a lower learning_rate "
                 "(or more warmup_steps).", "param": "hyperparameters.learning_rate"}
    elif isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        error = {"code": "out_of_memory", "message": "The job ran out of memory. Try a smaller batch_size (with more "
                 "grad_accum_steps) or a smaller model.", "param": "hyperparameters.batch_size"}
    else:
        reference = new_reference()
        log.error("job %s: internal error %s", job_id, reference, exc_info=exc)
        return {"code": "internal_error", "message": f"An internal error stopped the job (reference {reference}; "
                "the operators find the details under it in the worker's log).", "param": None,
                "reference": reference}
    log.warning("job %s failed: %s", job_id, error["code"], exc_info=exc)
    return error
