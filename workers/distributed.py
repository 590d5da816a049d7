"""A training job on several devices: the worker starts ``torchrun`` with one training process per device and
supervises it.

Celery's pool process does not fork training processes itself. It writes the run down (workers.launch), starts
``python -m torch.distributed.run --standalone --nproc_per_node N --max_restarts 0 -m workers.rank launch.json``
in a session of its own (NCCL between GPUs, gloo between CPU processes: gpt2core.distributed), and talks to the
processes over a private Unix socket (multiprocessing.connection, with a random key):

- every process says hello (its rank and pid) and, at its end, how it ended: rank 0 its TrainResult, the others
  "done"; or the job's error (the same classification as a one-device run: workers.runtime.error_for), or that
  training diverged;
- rank 0 forwards what the Trainer reports (steps, evaluations, samples, checkpoints: `ForwardingCallback`) and
  the worker hands it to the same callbacks a one-device run has (the JobReporter writes progress, metrics,
  events and checkpoint rows; CheckpointRetention bounds the disk); rank 0 asks the worker whether to stop
  before every step (a cancel, a pause, this worker's shutdown, a lost lease), and every rank stops at that step.

How it ends:

- rank 0's result: the run is over (or stopped at a checkpoint), as in one process;
- a job error from any process (training_diverged, invalid_file, out_of_memory, ...): the job fails with it;
- a process that ends without a word (killed: the out-of-memory killer, an operator, a crash in native code):
  the processes are started again, resuming from the last checkpoint, up to JOB_MAX_ATTEMPTS times in one
  delivery; then the job fails with "worker_lost". An internal error (a bug) fails the job with its reference.

The worker's lease on the job is renewed by its LeaseKeeper all along. If the worker itself dies, rank 0 finds
its socket closed at the next step and ends the run (the job is recovered as for any lost worker).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path
from typing import Any, Callable, Iterable

from gpt2core.callbacks import TrainResult
from gpt2core.stopping import TrainingDiverged
from gpt2core.train import latest_checkpoint

from .launch import TrainingLaunch
from .runtime import JobFailure

log = logging.getLogger("workers.distributed")

#: Environment variables that tell a training process where the worker listens, and its key (hex).
ADDRESS_VARIABLE, KEY_VARIABLE = "GPT2JOBS_CONTROL", "GPT2JOBS_CONTROL_KEY"
#: Seconds the processes get to reach the worker (torch's import and the rendezvous), and to end when told to.
CONNECT_SECONDS, STOP_SECONDS = 300.0, 30.0
#: When the job is to stop (cancel, pause, shutdown) and rank 0 has not asked whether to stop for this long (it
#: asks before every step), the processes are ended without it: the job resumes from its last checkpoint.
HUNG_SECONDS = 600.0


# ---- the training processes' side -----------------------------------------------------------------------------


def connect() -> Connection:
    """A training process's connection to its worker (from the environment workers.distributed sets)."""
    return Client(os.environ[ADDRESS_VARIABLE], family="AF_UNIX", authkey=bytes.fromhex(os.environ[KEY_VARIABLE]))


class ForwardingCallback:
    """Rank 0's Trainer callback: sends each report to the worker, and asks it whether to stop. A worker that is
    gone (its socket closed) stops the run at once: SystemExit, no checkpoint (the job is recovered elsewhere)."""

    def __init__(self, connection: Connection):
        self.connection = connection

    def _send(self, *message: Any) -> None:
        try:
            self.connection.send(message)
        except OSError:
            raise SystemExit("the worker supervising this training run is gone") from None

    def on_step(self, metrics) -> None:
        self._send("on_step", metrics)

    def on_eval(self, step: int, val_loss: float, perplexity: float, accuracy: float | None) -> None:
        self._send("on_eval", step, val_loss, perplexity, accuracy)

    def on_sample(self, step: int, samples) -> None:
        self._send("on_sample", step, samples)

    def on_checkpoint(self, step: int, path: Path, train_loss: float | None, val_loss: float | None) -> None:
        self._send("on_checkpoint", step, path, train_loss, val_loss)

    def should_stop(self) -> bool:
        self._send("should_stop")
        try:
            return bool(self.connection.recv())
        except (EOFError, OSError):
            raise SystemExit("the worker supervising this training run is gone") from None


# ---- the worker's side ------------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """What one start of the training processes came to."""

    result: TrainResult | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)  # what the processes reported, in arrival order
    diverged: tuple[int, str] | None = None  # (step, message)
    silent: list[int] = field(default_factory=list)  # ranks that ended without a word
    pids: dict[int, int] = field(default_factory=dict)  # rank -> pid
    exit_code: int | None = None
    started: dict[str, Any] | None = None  # rank 0's "started" report

    def error(self) -> dict[str, Any] | None:
        """The job's error, decided once every process has ended: the first job error reported (the job's own
        fault: training_diverged, out_of_memory, invalid_file, ...); else none when a process died without a word
        (the others' internal errors are what its death did to them: the processes start again); else the first
        internal error."""
        own = [e for e in self.errors if e.get("code") != "internal_error"]
        if own:
            return own[0]
        if self.silent or not self.errors:
            return None
        return self.errors[0]


def torchrun_command(devices: int, launch_file: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
            "--max_restarts=0", "--module", "workers.rank", str(launch_file)]


def process_environment(devices: int, device_type: str, address: str, key: str) -> dict[str, str]:
    """The training processes' environment: the worker's own, the socket, and on CPU an even share of the cores
    for each process's threads (torchrun would give each one thread)."""
    env = dict(os.environ)
    env.update({ADDRESS_VARIABLE: address, KEY_VARIABLE: key, "PYTHONUNBUFFERED": "1"})
    if device_type == "cpu":
        env["GPT2CORE_DEVICE"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    return env


class Supervisor:
    """Runs `launch` on its devices until it ends (see the module docstring). `callbacks` receive rank 0's reports;
    `events(message, level)` writes the job's events; `stop_requested()` is checked while no process asks."""

    def __init__(self, launch: TrainingLaunch, device_type: str, callbacks: Iterable[Any], *,
                 events: Callable[[str, str], None], stop_requested: Callable[[], bool], max_restarts: int):
        self.launch, self.device_type = launch, device_type
        self.callbacks = list(callbacks)
        self.events, self.stop_requested, self.max_restarts = events, stop_requested, max_restarts

    def run(self) -> TrainResult:
        """Rank 0's TrainResult; JobFailure for a job error, TrainingDiverged when the loss diverged."""
        restarts = 0
        while True:
            attempt = self.attempt()
            error = attempt.error()
            if error is not None:
                raise JobFailure(error["code"], error["message"], error.get("param"), error.get("reference"))
            if attempt.diverged is not None:
                step, message = attempt.diverged
                raise TrainingDiverged(message, step=step, loss=float("nan"), level=None, first_bad_step=step)
            if attempt.result is not None:
                return attempt.result
            stopped = self.stopped_result()
            if self.stop_requested() and stopped is not None:
                return stopped  # asked to stop anyway: it resumes from its last checkpoint later
            code = attempt.exit_code
            if code is not None and code < 0:  # torchrun itself was killed; its processes were ended after it
                who, how = "torchrun", f"was killed (signal {-code})"
            else:
                ranks = ", ".join(f"rank {r}" for r in sorted(set(attempt.silent)))
                who = f"training process {ranks}" if ranks else "torchrun"
                how = f"ended without a word (torchrun's exit code {code})"
            restarts += 1
            if restarts > self.max_restarts:
                raise JobFailure("worker_lost", f"The job's {who} {how}; its training processes ended that way "
                                 f"{restarts} times on this worker, more than allowed (JOB_MAX_ATTEMPTS="
                                 f"{self.max_restarts}): killed by the system (out of memory?) or an operator. Its last "
                                 "checkpoint is kept; the events list each start.")
            latest = latest_checkpoint(self.launch.config["checkpoint_dir"])
            where = (f"the checkpoint at step {int(latest.name.removeprefix('step-'))}" if latest is not None
                     else "the start (no checkpoint yet)")
            self.events(f"The {who} {how}; starting the {self.launch.devices} training processes again from {where} "
                        f"(restart {restarts} of at most {self.max_restarts})", "warning")

    def stopped_result(self) -> TrainResult | None:
        """The result of a run stopped at its last checkpoint (None: there is none)."""
        latest = latest_checkpoint(self.launch.config["checkpoint_dir"])
        if latest is None:
            return None
        step = int(latest.name.removeprefix("step-"))
        return TrainResult(steps=step, stopped=True, final_loss=None, val_loss=None, perplexity=None,
                           checkpoint=latest, stop_reason="stopped")

    def attempt(self) -> Attempt:
        """Start the processes once and follow them to their end."""
        folder = Path(tempfile.mkdtemp(prefix="gpt2jobs-"))  # short: a Unix socket's path has ~100 bytes
        address, key = str(folder / "control"), secrets.token_hex(16)
        launch_file = self.launch.write(folder / "launch.json")
        listener = Listener(address, family="AF_UNIX", authkey=bytes.fromhex(key))
        connections: dict[Connection, int | None] = {}  # -> rank, once it said hello
        arrivals: list[Connection] = []
        accepting = threading.Event()
        accepting.set()

        def accept() -> None:
            while accepting.is_set() and len(arrivals) < self.launch.devices:
                try:
                    arrivals.append(listener.accept())
                except Exception:  # closed, or a connection without the key
                    if not accepting.is_set():
                        return

        threading.Thread(target=accept, name="torchrun connections", daemon=True).start()
        env = process_environment(self.launch.devices, self.device_type, address, key)
        process = subprocess.Popen(torchrun_command(self.launch.devices, launch_file), env=env,
                                   start_new_session=True)
        attempt = Attempt()
        finished: set[int] = set()
        started_at = last_poll = time.monotonic()
        exited_at: float | None = None
        try:
            while True:
                while arrivals:
                    connections[arrivals.pop()] = None
                for connection in wait(list(connections), timeout=0.2):
                    try:
                        message = connection.recv()
                    except (EOFError, OSError):
                        rank = connections.pop(connection)
                        if rank is not None and rank not in finished:
                            attempt.silent.append(rank)
                        continue
                    if message[0] == "hello":
                        connections[connection] = message[1]
                    elif message[0] == "should_stop":
                        last_poll = time.monotonic()
                    elif message[0] in ("result", "done", "failed", "diverged") and connections[connection] is not None:
                        finished.add(connections[connection])  # type: ignore[arg-type]
                    self.handle(message, connection, attempt)
                now = time.monotonic()
                if process.poll() is not None:
                    exited_at = exited_at or now
                    if (not connections and not arrivals) or now - exited_at > 5:
                        break  # torchrun has ended, and so have its processes (or they say nothing more)
                elif not attempt.pids and now - started_at > CONNECT_SECONDS:
                    log.error("job %s: no training process connected in %.0f s", self.launch.job_id, CONNECT_SECONDS)
                    break
                elif self.stop_requested() and now - last_poll > HUNG_SECONDS:
                    log.error("job %s: asked to stop, but rank 0 has not asked in %.0f s; ending the processes",
                              self.launch.job_id, now - last_poll)
                    break
        finally:
            accepting.clear()
            listener.close()
            for connection in list(connections) + arrivals:
                connection.close()
            attempt.exit_code = end_processes(process, attempt.pids.values())
            shutil.rmtree(folder, ignore_errors=True)
        missing = [r for r in range(self.launch.devices) if r not in finished and r not in attempt.silent]
        if attempt.result is None and not attempt.errors and attempt.diverged is None:
            attempt.silent += missing
        return attempt

    def handle(self, message: tuple, connection: Connection, attempt: Attempt) -> None:
        kind, *args = message
        if kind == "hello":
            rank, pid = args
            attempt.pids[rank] = pid
        elif kind == "started":
            attempt.started = args[0]
            self.events(args[0]["message"], "info")
        elif kind == "should_stop":
            answers = [bool(cb.should_stop()) for cb in self.callbacks if hasattr(cb, "should_stop")]
            connection.send(any(answers))
        elif kind in ("on_step", "on_eval", "on_sample", "on_checkpoint"):
            for cb in self.callbacks:
                hook = getattr(cb, kind, None)
                if hook is not None:
                    hook(*args)
        elif kind == "result":
            attempt.result = args[0]
        elif kind == "failed":
            attempt.errors.append(args[0])
        elif kind == "diverged":
            attempt.diverged = attempt.diverged or (args[0], args[1])


def end_processes(process: subprocess.Popen, pids: Iterable[int]) -> int:
    """Make sure torchrun and every training process have ended (SIGTERM, then SIGKILL after STOP_SECONDS);
    returns torchrun's exit code."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)  # torchrun stops its processes itself
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for pid in pids:  # each training process leads a session of its own (torchrun starts them so)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return process.returncode
