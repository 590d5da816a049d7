"""`python -m demo`: the platform end to end on the embedded default, driven through its own REST API.

Starts the API (gunicorn) and one worker (celery) as local processes on SQLite and the filesystem broker (no
servers), then: uploads the English text that ships with Python (`pydoc_data.topics`) as a training file, trains
a small GPT-2 on CPU with live progress, fine-tunes it on the part about statements, bulk-generates from a few
prompts, and prints the text and where the models and results are. Everything lives under GPT2JOBS_VAR_DIR
(default ./var); the processes' logs go to var/logs/.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydoc_data.topics
import requests

from jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The for statement", "Exceptions are", "A class definition", "The import statement", "Lists are"]
FINETUNE_TOPICS = ("for", "while", "if", "try", "with", "import", "return", "break", "continue", "raise")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(name: str) -> str:
    script = Path(sys.executable).parent / name
    return str(script) if script.exists() else name


class Platform:
    """The API and one worker as child processes, stopped (warm shutdown) on exit."""

    def __init__(self, var: Path):
        self.var = var
        self.env = {**os.environ, "GPT2JOBS_VAR_DIR": str(var), "PYTHONUNBUFFERED": "1"}
        self.logs = var / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.url = f"http://127.0.0.1:{free_port()}"

    def run(self, *argv: str) -> str:
        done = subprocess.run([command(argv[0]), *argv[1:]], cwd=ROOT, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self, name: str, *argv: str) -> None:
        log = (self.logs / f"{name}.log").open("w")
        self.processes.append(subprocess.Popen([command(argv[0]), *argv[1:]], cwd=ROOT, env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> "Platform":
        self.run("alembic", "upgrade", "head")
        self.start("api", "gunicorn", "--bind", self.url.removeprefix("http://"), "--workers", "2", "api:create_app()")
        self.start("worker", "celery", "-A", "workers", "worker", "--loglevel", "INFO", "--queues", "train,generate",
                   "--concurrency", "1")
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
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


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

    def wait(self, job: dict) -> dict:
        """Poll the job until it ends, printing its progress and new events."""
        seen_event = None
        while True:
            job = self.call("GET", f"/v1/jobs/{job['id']}")
            events = self.call("GET", f"/v1/jobs/{job['id']}/events",
                               params={"limit": 100, **({"after": seen_event} if seen_event else {})})
            for event in events["data"]:
                seen_event = event["id"]
                if event["type"] == "message" or "val_loss" in (event["data"] or {}):
                    print(f"  [{job['type']}] {event['message']}", flush=True)
            progress = job["progress"]
            if job["type"] != "generate" and progress.get("step"):
                print(f"  [{job['type']}] step {progress['step']}/{progress['total_steps']}  loss {progress['loss']}"
                      f"  {progress['tokens_per_second'] or 0:,.0f} tok/s  eta {progress['eta_seconds']} s",
                      flush=True)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    sys.exit(f"job {job['id']} {job['status']}: {json.dumps(job['error'])}")
                return job
            time.sleep(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    var = settings.artifact_dir.parent
    corpus_dir = var / "demo"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    corpus = corpus_dir / "pydoc_topics.txt"
    corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    statements = corpus_dir / "statements.txt"
    statements.write_text("\n\n".join(pydoc_data.topics.topics[t] for t in FINETUNE_TOPICS
                                      if t in pydoc_data.topics.topics), encoding="utf-8")

    started = time.monotonic()
    with Platform(var) as platform:
        key = platform.run("flask", "--app", "api", "keys", "create", "--owner", "demo").strip().splitlines()[-1]
        api = Client(platform.url, key)
        print(f"platform up at {platform.url} (SQLite and the filesystem broker under {var}); API key {key[:10]}...")

        training_file = api.upload(corpus, "train")
        print(f"uploaded {training_file['filename']}: {training_file['bytes']:,} bytes as {training_file['id']}")
        job = api.call("POST", "/v1/jobs", json={
            "type": "train", "training_file": training_file["id"], "suffix": "pydoc",
            "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
            "hyperparameters": {"max_steps": args.steps, "batch_size": 8, "learning_rate": 3e-3,
                                "eval_every": max(args.steps // 4, 1), "checkpoint_every": max(args.steps // 2, 1)},
            "seed": 0,
        })
        print(f"training job {job['id']} {job['status']}")
        job = api.wait(job)
        base = job["result"]["model"]
        print(f"trained {base}: val loss {job['result']['val_loss']:.3f}")

        finetune_file = api.upload(statements, "train")
        job = api.call("POST", "/v1/jobs", json={
            "type": "finetune", "training_file": finetune_file["id"], "model": base, "suffix": "statements",
            "hyperparameters": {"max_steps": max(args.steps // 5, 1), "batch_size": 8, "learning_rate": 1e-3,
                                "eval_every": max(args.steps // 10, 1)},
            "seed": 0,
        })
        print(f"fine-tuning job {job['id']} from {base}")
        job = api.wait(job)
        tuned = job["result"]["model"]
        print(f"fine-tuned {tuned}: val loss {job['result']['val_loss']:.3f}")

        job = api.call("POST", "/v1/jobs", json={
            "type": "generate", "model": tuned, "prompts": PROMPTS,
            "sampling": {"max_new_tokens": 40, "temperature": 0.7, "top_k": 40, "seed": 1},
        })
        print(f"generation job {job['id']}: {len(PROMPTS)} prompts")
        job = api.wait(job)
        results = api.get(f"{platform.url}/v1/jobs/{job['id']}/results.jsonl", timeout=60)
        results_file = corpus_dir / f"{job['id']}-results.jsonl"
        results_file.write_text(results.text, encoding="utf-8")
        for line in results.text.splitlines():
            result = json.loads(line)
            print(f"\n>>> {result['prompt']}{result['completions'][0]['text']}")
        models = [api.call("GET", f"/v1/models/{model_id}") for model_id in (base, tuned)]

    print(f"\ndone in {time.monotonic() - started:.0f} s")
    for model in models:
        print(f"model {model['id']} ({model['name']}, {model['parameter_count']:,} parameters): "
              f"{settings.artifact_dir / 'models' / model['id']} (Hugging Face format; "
              f"GET /v1/models/{model['id']}/download)")
    print(f"results: {results_file} (GET /v1/jobs/{job['id']}/results.jsonl)")
    print(f"logs: {var / 'logs'}")


if __name__ == "__main__":
    main()
