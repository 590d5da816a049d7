"""What a worker process shares across tasks (settings, database, artifacts, its identity), the lease keeper
that proves it still owns its work, and how a failure becomes an error a user can act on."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Celery
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_engine, make_session_factory, session_scope
from jobs.execution import LeaseLost
from jobs.queue import make_celery
from jobs.settings import Settings
from jobs.states import CANCELLING
from jobs.storage import ArtifactStore

log = logging.getLogger("workers")
T = TypeVar("T")


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

    def retrying(self, unit: Callable[[Session], T], attempts: int = 3) -> T:
        """Run `unit` in a transaction, again (after a short pause) if the database aborts it for a transient
        reason (a deadlock, a dropped connection): for writes too costly to lose, like a shard's results."""
        for attempt in range(1, attempts):
            try:
                with self.transaction() as session:
                    return unit(session)
            except OperationalError:
                log.warning("transient database error; retrying (%d/%d)", attempt, attempts - 1, exc_info=True)
                time.sleep(0.2 * attempt)
        with self.transaction() as session:
            return unit(session)


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
        return self.cancelling or self.lost

    def observe(self, status: str) -> None:
        if status == CANCELLING and not self.cancelling:
            log.info("%s: cancellation requested", self.what)
            self.cancelling = True

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
            except Exception:  # a database hiccup: the next renewal tries again before the lease runs out
                log.exception("%s: lease renewal failed", self.what)


class JobFailure(Exception):
    """A failure with an error code a user can act on (the job ends failed with this error)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def error_for(exc: BaseException) -> dict[str, Any]:
    """The job's `error` for an exception: a stable code, a message and the parameter it is about."""
    if isinstance(exc, JobFailure):
        return {"code": exc.code, "message": exc.message, "param": exc.param}
    from gpt2core import CheckpointError, DatasetError

    if isinstance(exc, DatasetError):
        return {"code": "invalid_file", "message": str(exc), "param": "training_file"}
    if isinstance(exc, CheckpointError):
        return {"code": "invalid_model", "message": str(exc), "param": "model"}
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return {"code": "out_of_memory", "message": f"The job ran out of memory: {exc}. Try a smaller batch_size "
                "(with more grad_accum_steps) or a smaller model.", "param": "hyperparameters.batch_size"}
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "param": None}
