"""`python -m demo`: the platform end to end on the embedded default, driven through its own REST API.

Starts the API (gunicorn) and one worker (celery) as local processes on SQLite and the filesystem broker (no
servers), then: uploads the English text that ships with Python (`pydoc_data.topics`) as a training file, trains
a small GPT-2 on CPU with a live progress bar, fine-tunes it on the part about statements, bulk-generates from a
few prompts, and prints the text, where the models and results are, and how to explore them in the dashboard and
with the `gpt2jobs` CLI (`--keep-running` leaves the platform up for that).

Everything lives under <GPT2JOBS_VAR_DIR, default ./var>/demo, which each run starts afresh, so a run never
inherits an earlier run's jobs; DATABASE_URL, BROKER_URL and ARTIFACT_DIR are ignored (the demo must not take
work from, or leave work on, another deployment). Ctrl-C cancels the demo's unfinished jobs through the API and
stops every process the demo started.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pydoc_data.topics
from rich.console import Console

from gpt2jobs_client import Client, GPT2JobsError, Job
from gpt2jobs_client.cli.progress import follow

from .local import LocalPlatform, StartError

PROMPTS = ["The for statement", "Exceptions are", "A class definition", "The import statement", "Lists are"]
FINETUNE_TOPICS = ("for", "while", "if", "try", "with", "import", "return", "break", "continue", "raise")
FOREIGN_SETTINGS = ("DATABASE_URL", "BROKER_URL", "ARTIFACT_DIR")
CANCEL_WAIT = 20.0  # seconds Ctrl-C waits for cancelled jobs to stop before stopping the processes
console = Console(highlight=False, soft_wrap=True)


class Demo:
    """One run: its folder, platform, client and the jobs it submitted (cancelled if the run is interrupted)."""

    def __init__(self, folder: Path, args: argparse.Namespace):
        self.folder, self.args = folder, args
        self.platform = LocalPlatform(folder, env={name: None for name in FOREIGN_SETTINGS}, port=args.port,
                                      start_timeout=args.start_timeout)
        self.client: Client | None = None
        self.key = ""
        self.submitted: list[str] = []

    def submit(self, **body) -> Job:
        assert self.client is not None
        job = self.client.jobs.create(body)
        self.submitted.append(job.id)
        return job

    def follow(self, job: Job, what: str) -> Job:
        assert self.client is not None
        console.print(f"[bold]{what}[/bold]: job {job.id}")
        done, _ = follow(self.client, job.id, live=True, events=True)
        if done.status != "succeeded":
            error = done.error or {}
            raise SystemExit(f"job {done.id} {done.status}: {error.get('code')}: {error.get('message')}")
        return done

    def run(self) -> None:
        args = self.args
        corpus = self.folder / "pydoc_topics.txt"
        corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
        statements = self.folder / "statements.txt"
        statements.write_text("\n\n".join(pydoc_data.topics.topics[t] for t in FINETUNE_TOPICS
                                          if t in pydoc_data.topics.topics), encoding="utf-8")
        with console.status("Starting the platform (API and worker; slow machines take a while)..."):
            self.platform.start()
            self.key = self.platform.run("flask", "--app", "api", "keys", "create", "--owner", "demo").split()[-1]
        self.client = Client(self.platform.url, self.key)
        if args.port and not self.platform.url.endswith(f":{args.port}"):
            console.print(f"Port {args.port} is taken; using another one.")
        console.print(f"Platform up at {self.platform.url} (SQLite and the filesystem broker under {self.folder})")

        training_file = self.client.files.upload(corpus, "train")
        console.print(f"Uploaded {training_file.filename}: {training_file.bytes:,} bytes as {training_file.id}")
        job = self.submit(type="train", training_file=training_file.id, suffix="pydoc", seed=0,
                          model={"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
                          hyperparameters={"max_steps": args.steps, "batch_size": 8, "learning_rate": 3e-3,
                                           "eval_every": max(args.steps // 4, 1),
                                           "checkpoint_every": max(args.steps // 2, 1)})
        trained = self.follow(job, "Training a 4-layer GPT-2 from scratch")
        base = trained.output_model
        console.print(f"Trained model {base}: validation loss {trained.result['val_loss']:.3f}\n")

        finetune_file = self.client.files.upload(statements, "train")
        job = self.submit(type="finetune", training_file=finetune_file.id, model=base, suffix="statements", seed=0,
                          hyperparameters={"max_steps": max(args.steps // 5, 1), "batch_size": 8,
                                           "learning_rate": 1e-3, "eval_every": max(args.steps // 10, 1)})
        tuned_job = self.follow(job, f"Fine-tuning {base} on the statements' documentation")
        tuned = tuned_job.output_model
        console.print(f"Fine-tuned model {tuned}: validation loss {tuned_job.result['val_loss']:.3f}\n")

        job = self.submit(type="generate", model=tuned, prompts=PROMPTS,
                          sampling={"max_new_tokens": 40, "temperature": 0.7, "top_k": 40, "seed": 1})
        generated = self.follow(job, f"Generating from {len(PROMPTS)} prompts")
        results_file = self.folder / f"{generated.id}-results.jsonl"
        with results_file.open("w", encoding="utf-8") as out:
            for result in self.client.jobs.results(generated.id):
                out.write(json.dumps(result.raw, ensure_ascii=False) + "\n")
                console.print(f"\n>>> [bold]{result.prompt}[/bold]{result.completions[0]['text']}")
        self.report(trained.id, [base, tuned], results_file, generated.id)

    def report(self, train_id: str, model_ids: list[str], results_file: Path, generate_id: str) -> None:
        assert self.client is not None
        console.print()
        for model_id in model_ids:
            model = self.client.models.get(model_id)
            console.print(f"Model {model.id} ({model.name}, {model.parameter_count:,} parameters): "
                          f"{self.folder / 'artifacts' / 'models' / model.id} (Hugging Face format)")
        console.print(f"Results: {results_file}")
        console.print(f"Logs: {self.platform.logs}")
        url, key = self.platform.url, self.key
        explore = (f"\nExplore:\n  dashboard  {url}/jobs/{train_id}  (sign in with the API key {key})\n"
                   f"  CLI        export GPT2JOBS_API_URL={url} GPT2JOBS_API_KEY={key}\n"
                   f"             gpt2jobs jobs list; gpt2jobs jobs events {train_id}; "
                   f"gpt2jobs jobs results {generate_id}\n"
                   f"  REST       curl -H 'Authorization: Bearer {key}' {url}/v1/jobs/{train_id}/metrics.csv")
        if self.args.keep_running:
            console.print(explore + "\n\nThe platform keeps running for that; press Ctrl-C to stop it.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                console.print()
                return
        console.print("\nTo explore the jobs in the dashboard and with the CLI, run `python -m demo --keep-running`: "
                      "it leaves the platform up at the end and prints an API key.")

    def interrupted(self) -> None:
        """Ctrl-C: cancel the demo's unfinished jobs through the API, so the worker ends their tasks now."""
        if self.client is None or not self.submitted:
            console.print("\n[bold]Interrupted[/bold]" + (" while starting" if self.client is None else ""))
            return
        console.print("\n[bold]Interrupted[/bold]")
        pending = []
        for job_id in self.submitted:
            try:
                job = self.client.jobs.get(job_id)
                if not job.is_terminal:
                    console.print(f"Cancelling the demo's unfinished job {job_id} ({job.type}, {job.status})...")
                    job = self.client.jobs.cancel(job_id)
                    pending.append(job_id)
            except GPT2JobsError as exc:
                console.print(f"  {job_id}: could not cancel ({exc})")
        deadline = time.monotonic() + CANCEL_WAIT
        while pending and time.monotonic() < deadline:
            try:
                pending = [j for j in pending if not self.client.jobs.get(j).is_terminal]
            except GPT2JobsError:
                break
            time.sleep(0.5)


def demo_folder() -> Path:
    """<var>/demo, emptied; SystemExit if another demo still runs there."""
    folder = Path(os.environ.get("GPT2JOBS_VAR_DIR") or "var").resolve() / "demo"
    pid_file = folder / "demo.pid"
    try:
        other = int(pid_file.read_text())
        os.kill(other, 0)
        if other != os.getpid():
            raise SystemExit(f"another `python -m demo` (pid {other}) is using {folder}; stop it first")
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        pass
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pid_file.write_text(str(os.getpid()))
    return folder


def positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def port(text: str) -> int:
    number = int(text)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {number}")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive, default=400, help="training steps (default 400)")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the platform running at the end, to explore it in the dashboard and the CLI")
    parser.add_argument("--port", type=port, default=8000,
                        help="the API's port, if free, else any free one (default 8000; 0: any)")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds the platform may take to start (default 300)")
    args = parser.parse_args(argv)
    ignored = [name for name in FOREIGN_SETTINGS if os.environ.get(name)]
    if ignored:
        console.print(f"Note: {', '.join(ignored)} ignored: the demo runs its own embedded platform.")
    # SIGTERM (a terminal closed, `kill`) ends the run like Ctrl-C: jobs cancelled, processes stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    demo = Demo(demo_folder(), args)
    try:
        demo.run()
        console.print(f"\nDone in {time.monotonic() - started:.0f} s.")
        return 0
    except KeyboardInterrupt:
        try:
            demo.interrupted()
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop at once
        return 130
    except StartError as exc:
        console.print(f"[bold red]The platform did not start[/bold red]: {exc}")
        return 1
    finally:
        if demo.platform.processes:
            console.print("Stopping the API and the worker...")
            try:
                demo.platform.stop()
            except KeyboardInterrupt:
                demo.platform.stop(timeout=0)
            console.print("Stopped: no process of the demo is left running.")
        if demo.client is not None:
            demo.client.close()
        (demo.folder / "demo.pid").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
