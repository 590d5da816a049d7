"""Following a job to its end: a live rich progress bar on a terminal, else a plain line per change; the exit code."""
from __future__ import annotations

import time
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from ..client import Client
from ..types import Job
from . import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK

#: Weight of the newest rate in the moving average of seconds per step (or per prompt).
SMOOTHING = 0.3
POLL_INTERVAL = 1.0


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def number(value: Any, form: str = "{:.4f}") -> str:
    return "-" if value is None else form.format(value)


class Tracker:
    """Turns successive job snapshots into (done, total, details), with an ETA from an exponential moving average
    of the seconds each step (or prompt) took, as seen between snapshots."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None
        self.per_unit: float | None = None

    def counts(self, job: Job) -> tuple[int, int | None]:
        p = job.progress
        if job.type == "generate":
            return int(p.get("completed") or 0) + int(p.get("failed") or 0), p.get("total")
        return int(p.get("step") or 0), p.get("total_steps")

    def eta(self, job: Job, done: int, total: int | None) -> float | None:
        now = time.monotonic()
        if self.last is not None and done > self.last[1]:
            rate = (now - self.last[0]) / (done - self.last[1])
            self.per_unit = rate if self.per_unit is None else SMOOTHING * rate + (1 - SMOOTHING) * self.per_unit
        if self.last is None or done != self.last[1]:
            self.last = (now, done)
        if job.is_terminal or total is None or self.per_unit is None:
            return None
        return max(total - done, 0) * self.per_unit

    def describe(self, job: Job) -> tuple[int, int | None, str]:
        done, total = self.counts(job)
        eta = self.eta(job, done, total)
        p = job.progress
        if job.type == "generate":
            details = f"completed {p.get('completed', 0)} failed {p.get('failed', 0)}"
        else:
            details = (f"loss {number(p.get('loss'))} val_loss {number(p.get('val_loss'))} "
                       f"{number(p.get('tokens_per_second'), '{:.0f}')} tok/s")
        if not job.is_terminal:
            details += f" eta {duration(eta)}"
        return done, total, details


def line(job: Job, done: int, total: int | None, details: str) -> str:
    unit = "prompts" if job.type == "generate" else "step"
    return f"{job.id} {job.status} {unit} {done}/{total if total is not None else '?'} {details}"


def report_end(job: Job) -> int:
    """Say how the job ended; its exit code."""
    if job.status == "succeeded":
        made = f": model {job.output_model}" if job.output_model else ""
        click.echo(f"{job.id} succeeded{made}", err=True)
        return EXIT_OK
    error = job.error or {}
    if job.status == "cancelled":
        click.echo(f"{job.id} cancelled", err=True)
        return EXIT_CANCELLED
    click.echo(f"error: job {job.id} failed: {error.get('code', 'unknown')}: {error.get('message', '(no message)')}", err=True)
    return EXIT_FAILED


def follow(client: Client, job_id: str, live: bool = True, poll_interval: float = POLL_INTERVAL) -> tuple[Job, int]:
    """Poll the job until it has finished, showing its progress on stderr; the finished job and its exit code.
    The live bar needs `live` and a terminal; otherwise a plain line is printed per change."""
    console = Console(stderr=True)
    tracker = Tracker()
    if not (live and console.is_terminal):
        def plain(job: Job) -> None:
            console.print(line(job, *tracker.describe(job)), markup=False, highlight=False, soft_wrap=True)

        job = client.jobs.wait(job_id, on_progress=plain, poll_interval=poll_interval)
        return job, report_end(job)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[details]}"))
    with Progress(*columns, console=console) as bar:
        task: TaskID | None = None

        def update(job: Job) -> None:
            nonlocal task
            done, total, details = tracker.describe(job)
            description = f"{job.id} {job.status}"
            if task is None:
                task = bar.add_task(description, total=total, completed=done, details=details)
            else:
                bar.update(task, description=description, total=total, completed=done, details=details)

        job = client.jobs.wait(job_id, on_progress=update, poll_interval=poll_interval)
    return job, report_end(job)
