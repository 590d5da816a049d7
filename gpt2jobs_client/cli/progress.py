"""Following a job to its end (or until it is paused): a live rich progress bar on a terminal, else a plain line per
change; the exit code."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from ..client import Client
from ..jobs import MAX_EVENT_ID
from ..types import Event, Job
from . import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_PAUSED

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
        if job.is_settled or total is None or self.per_unit is None:
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
        if not job.is_settled:
            details += f" eta {duration(eta)}"
        return done, total, details


def line(job: Job, done: int, total: int | None, details: str) -> str:
    unit = "prompts" if job.type == "generate" else "step"
    return f"{job.id} {job.status} {unit} {done}/{total if total is not None else '?'} {details}"


def report_end(job: Job) -> int:
    """Say how the job ended (or that it is paused); its exit code."""
    if job.status == "succeeded":
        made = f": model {job.output_model}" if job.output_model else ""
        click.echo(f"{job.id} succeeded{made}", err=True)
        return EXIT_OK
    error = job.error or {}
    if job.status == "cancelled":
        click.echo(f"{job.id} cancelled", err=True)
        return EXIT_CANCELLED
    if job.is_paused:
        done, total = Tracker().counts(job)
        where = f"{done}/{total if total is not None else '?'}"
        where = f"with {where} prompts done" if job.type == "generate" else f"at step {where}"
        click.echo(f"{job.id} paused {where}; it continues from there once resumed: gpt2jobs jobs resume {job.id}",
                   err=True)
        return EXIT_PAUSED
    click.echo(f"error: job {job.id} failed: {error.get('code', 'unknown')}: {error.get('message', '(no message)')}", err=True)
    return EXIT_FAILED


def event_line(event: Event) -> str | None:
    """What `follow(events=True)` prints of an event: messages and evaluations (not every step's metrics)."""
    if event.type == "metrics" and "val_loss" not in (event.data or {}):
        return None
    return f"{event.level}: {event.message}" if event.level != "info" else event.message


def follow(client: Client, job_id: str, live: bool = True, events: bool = False,
           poll_interval: float = POLL_INTERVAL) -> tuple[Job, int]:
    """Follow the job to its end (the API's live event stream), or until it is paused (a paused job does not go on
    by itself), showing its progress on stderr and, with `events`, its messages and evaluations above it; the
    finished (or paused) job and its exit code. The live bar needs `live` and a terminal; otherwise a plain line is
    printed per change."""
    console = Console(stderr=True)
    tracker = Tracker()
    bar: Progress | None = None
    task: TaskID | None = None
    if live and console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[details]}"))
        bar = Progress(*columns, console=console)
    job: Job | None = None
    with bar or nullcontext():
        for item in client.jobs.stream(job_id, after=None if events else MAX_EVENT_ID, poll_interval=poll_interval):
            if isinstance(item, Event):
                text = event_line(item)
                if text is not None:
                    console.print(f"  {text}", markup=False, highlight=False, soft_wrap=True)
                continue
            job = item
            done, total, details = tracker.describe(job)
            if bar is None:
                console.print(line(job, done, total, details), markup=False, highlight=False, soft_wrap=True)
            elif task is None:
                task = bar.add_task(f"{job.id} {job.status}", total=total, completed=done, details=details)
            else:
                bar.update(task, description=f"{job.id} {job.status}", total=total, completed=done, details=details)
            if job.is_settled:
                break
    assert job is not None and job.is_settled
    return job, report_end(job)
