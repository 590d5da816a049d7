"""The platform on this machine: the API (gunicorn) and workers (celery) as child processes on the settings in
the environment (by default the embedded SQLite and filesystem broker under ./var), and a small REST client."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script(name: str) -> str:
    """A console script (gunicorn, celery, alembic, flask) from this interpreter's environment, if it is there."""
    script = Path(sys.executable).parent / name
    return str(script) if script.exists() else name


class LocalPlatform:
    """The API and `workers` worker processes as children, stopped (warm shutdown) on exit. `env` overrides
    settings (e.g. DATABASE_URL, BROKER_URL)."""

    def __init__(self, var: Path, workers: int = 1, env: dict[str, str] | None = None):
        self.var = var
        self.workers = workers
        self.env = {**os.environ, "GPT2JOBS_VAR_DIR": str(var), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.logs = var / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.url = f"http://127.0.0.1:{free_port()}"

    def run(self, *argv: str) -> str:
        done = subprocess.run([console_script(argv[0]), *argv[1:]], cwd=ROOT, env=self.env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self, name: str, *argv: str) -> None:
        log = (self.logs / f"{name}.log").open("w")
        self.processes.append(subprocess.Popen([console_script(argv[0]), *argv[1:]], cwd=ROOT, env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> "LocalPlatform":
        self.run("alembic", "upgrade", "head")
        self.start("api", "gunicorn", "--bind", self.url.removeprefix("http://"), "--workers", "2", "api:create_app()")
        for n in range(self.workers):
            self.start(f"worker{n + 1}", "celery", "-A", "workers", "worker", "--loglevel", "INFO", "--queues",
                       "train,generate", "--concurrency", "1", "--hostname", f"worker{n + 1}@%h")
        for _ in range(300):
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.2)
        self.__exit__()
        sys.exit(f"the platform did not start; see {self.logs}")

    def __exit__(self, *exc_info) -> None:
        for process in self.processes:  # the main processes only: a warm shutdown lets a task finish cleanly
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # anything left of its process group
            except ProcessLookupError:
                pass


class Client(requests.Session):
    def __init__(self, url: str, key: str):
        super().__init__()
        self.url = url
        self.headers["Authorization"] = f"Bearer {key}"

    def call(self, method: str, path: str, **kwargs) -> dict:
        response = self.request(method, self.url + path, timeout=60, **kwargs)
        if response.status_code >= 400:
            sys.exit(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json()

    def upload(self, path: Path, purpose: str) -> dict:
        with path.open("rb") as handle:
            return self.call("POST", "/v1/files", files={"file": (path.name, handle)}, data={"purpose": purpose})

    def wait(self, job: dict, quiet: bool = False) -> dict:
        """Poll the job until it ends, printing its progress and new events (unless quiet)."""
        seen_event, seen_step = None, None
        while True:
            job = self.call("GET", f"/v1/jobs/{job['id']}")
            if not quiet:
                events = self.call("GET", f"/v1/jobs/{job['id']}/events",
                                   params={"limit": 100, **({"after": seen_event} if seen_event else {})})
                for event in events["data"]:
                    seen_event = event["id"]
                    if event["type"] == "message" or "val_loss" in (event["data"] or {}):
                        print(f"  [{job['type']}] {event['message']}", flush=True)
            progress = job["progress"]
            if not quiet and job["type"] != "generate" and progress.get("step") not in (None, 0, seen_step):
                seen_step = progress["step"]
                print(f"  [{job['type']}] step {progress['step']}/{progress['total_steps']}  loss {progress['loss']}"
                      f"  {progress['tokens_per_second'] or 0:,.0f} tok/s  eta {progress['eta_seconds']} s",
                      flush=True)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    sys.exit(f"job {job['id']} {job['status']}: {json.dumps(job['error'])}")
                return job
            time.sleep(0.25 if quiet else 2)
