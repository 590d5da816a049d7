"""The platform on this machine: the API (gunicorn) and workers (celery) as child processes, each in a process
group of its own, on the settings in `env` (by default the embedded SQLite and filesystem broker under the var
folder). Start-up waits for the API however slow the machine is (up to `start_timeout`) and stops whatever it
started if anything fails; stop() ends every process it started, whatever state they are in."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300.0  # seconds the API may take to answer /readyz on a busy machine
STOP_TIMEOUT = 30.0  # seconds a process gets to end after SIGTERM before its process group is killed


class StartError(RuntimeError):
    """The platform did not come up; the message says why and where the logs are."""


def free_port(preferred: int | None = None) -> int:
    """`preferred` if nothing listens there on 127.0.0.1, else a free port the system picks. (SO_REUSEADDR, as
    gunicorn binds: a port whose earlier connections linger in TIME_WAIT is free for it.)"""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free port")


def die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM it when the process that started it dies, even by SIGKILL, so no
    API or worker outlives a demo that could not stop them itself."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def console_script(name: str) -> str:
    """A console script (gunicorn, celery, alembic, flask) from this interpreter's environment, if it is there."""
    script = Path(sys.executable).parent / name
    return str(script) if script.exists() else name


class LocalPlatform:
    """The API and `workers` worker processes as children: `with LocalPlatform(var) as platform: ...` starts them
    and stops them on the way out (also on an exception or Ctrl-C). `env` overrides settings (DATABASE_URL,
    BROKER_URL, ...; None unsets one); `port` is used if free."""

    def __init__(self, var: Path, workers: int = 1, env: dict[str, str | None] | None = None,
                 port: int | None = None, start_timeout: float = START_TIMEOUT):
        self.var = var
        self.workers = workers
        merged = {**os.environ, "GPT2JOBS_VAR_DIR": str(var), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env = {name: value for name, value in merged.items() if value is not None}  # None: unset
        self.logs = var / "logs"
        self.processes: dict[str, subprocess.Popen] = {}
        self.url = f"http://127.0.0.1:{free_port(port)}"
        self.start_timeout = start_timeout

    def run(self, *argv: str) -> str:
        """A one-shot command (alembic, flask) in the platform's environment; its output, StartError if it fails."""
        done = subprocess.run([console_script(argv[0]), *argv[1:]], cwd=ROOT, env=self.env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise StartError(f"`{' '.join(argv)}` failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def spawn(self, name: str, *argv: str) -> None:
        with (self.logs / f"{name}.log").open("w") as log:
            self.processes[name] = subprocess.Popen(
                [console_script(argv[0]), *argv[1:]], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C reaches us, not them: we stop them
                preexec_fn=die_with_parent)

    def start(self) -> "LocalPlatform":
        """Migrate, start the API and the workers, and wait until the API answers /readyz; StartError (with
        everything started stopped again) if a process exits or the API does not answer within start_timeout."""
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self.run("alembic", "upgrade", "head")
            # gunicorn.conf.py (read from ROOT) sets the worker class and threads.
            self.spawn("api", "gunicorn", "--bind", self.url.removeprefix("http://"), "api:create_app()")
            for n in range(self.workers):
                self.spawn(f"worker{n + 1}", "celery", "-A", "workers", "worker", "--loglevel", "INFO",
                           "--concurrency", "1", "--hostname", f"worker{n + 1}@%h")
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            exited = [name for name, process in self.processes.items() if process.poll() is not None]
            if exited:
                raise StartError(f"{', '.join(exited)} exited while starting; see {self.logs}")
            try:
                patience = min(10.0, max(deadline - time.monotonic(), 0.05))  # no try outlives the deadline
                if httpx.get(f"{self.url}/readyz", timeout=patience).status_code == 200:
                    return
            except httpx.HTTPError:  # not listening yet, too busy to answer in time, or a reset: all mean wait
                pass
            if time.monotonic() > deadline:
                raise StartError(f"the API did not answer {self.url}/readyz within {self.start_timeout:.0f} s; "
                                 f"see {self.logs}")
            time.sleep(0.5)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to every process started (a worker's warm shutdown hands its task back), then SIGKILL to the
        process group of any still there after `timeout` seconds, and to what is left of every group."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the process group: pool children included
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        self.processes.clear()

    def __enter__(self) -> "LocalPlatform":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
