"""`gpt2jobs jobs ...`: create (train, finetune, generate), list, get, cancel, events, results, watch."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..types import Job
from . import FiniteFloat, cli, emit, json_option, show, show_all, state, table
from .progress import follow


def job_summary(job: Job) -> str:
    p = job.progress
    if job.type == "generate":
        return f"{(p.get('completed') or 0) + (p.get('failed') or 0)}/{p.get('total')}"
    return f"{p.get('step', 0)}/{p.get('total_steps')}"


def job_rows(items: list[Job]) -> None:
    table(["id", "type", "status", "progress", "model"],
          [[j.id, j.type, j.status, job_summary(j), j.model if isinstance(j.model, str) else json.dumps(j.model)] for j in items])


def finish(ctx: click.Context, job: Job, as_json: bool, wait: bool) -> None:
    """Print the job (with --json and `wait`: once it has finished); with `wait`, follow it to its end and exit with
    its code."""
    if not as_json:
        click.echo(f"{job.id} {job.status} ({job.type})")
    if not wait:
        if as_json:
            emit(job.raw)
        return
    done, code = follow(state(ctx).client, job.id, live=state(ctx).progress)
    if as_json:
        emit(done.raw)
    ctx.exit(code)


@cli.group()
def jobs() -> None:
    """Create, list, show, cancel and follow jobs."""


@jobs.group("create")
def create() -> None:
    """Submit a train, finetune or generate job."""


def training_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--training-file", required=True, help="A file id with purpose train."),
        click.option("--validation-file", help="A file id with purpose train."),
        click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (not with --epochs)."),
        click.option("--epochs", type=FiniteFloat(), help="Passes over the data (not with --max-steps)."),
        click.option("--batch-size", type=click.IntRange(min=1)),
        click.option("--learning-rate", type=FiniteFloat()),
        click.option("--suffix", help="Appended to the output model's name."),
        click.option("--seed", type=click.IntRange(min=0)),
        click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it has finished."),
        json_option,
        click.pass_context,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def submit_training(ctx: click.Context, kind: str, model: Any, options: dict[str, Any]) -> None:
    if options["max_steps"] is not None and options["epochs"] is not None:
        raise click.UsageError("--max-steps and --epochs are mutually exclusive")
    hyperparameters = {key: value for key, value in {
        "max_steps": options["max_steps"], "n_epochs": options["epochs"], "batch_size": options["batch_size"],
        "learning_rate": options["learning_rate"]}.items() if value is not None}
    body: dict[str, Any] = {"type": kind, "training_file": options["training_file"], "hyperparameters": hyperparameters}
    for key in ("validation_file", "suffix", "seed"):
        if options[key] is not None:
            body[key] = options[key]
    if model is not None:
        body["model"] = model
    job = state(ctx).client.jobs.create(body)
    finish(ctx, job, options["as_json"], options["wait"])


def parse_model(value: str | None) -> Any:
    if value is None or not value.lstrip().startswith("{"):
        return value
    def refuse(constant: str) -> Any:
        raise click.BadParameter(f"{constant} is not JSON", param_hint="--model")

    try:
        return json.loads(value, parse_constant=refuse)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not a JSON object: {error}", param_hint="--model") from None


@create.command("train")
@click.option("--model", help='A preset (gpt2, gpt2-medium, ...) or a shape as JSON: '
              '\'{"n_layer":6,"n_head":6,"n_embd":384,"block_size":256}\'.')
@training_options
def create_train(ctx: click.Context, model: str | None, **options: Any) -> None:
    """Train a model from scratch."""
    submit_training(ctx, "train", parse_model(model), options)


@create.command("finetune")
@click.option("--model", required=True, help="The id of the model to start from.")
@training_options
def create_finetune(ctx: click.Context, model: str, **options: Any) -> None:
    """Fine-tune a registered model."""
    submit_training(ctx, "finetune", model, options)


@create.command("generate")
@click.option("--model", required=True, help="The id of the model to generate with.")
@click.option("--input-file", help="A file id with purpose generate (not with --prompt).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable; not with --input-file).")
@click.option("--max-new-tokens", type=click.IntRange(min=1))
@click.option("--temperature", type=FiniteFloat(low=0))
@click.option("--top-k", type=click.IntRange(min=0))
@click.option("--top-p", type=FiniteFloat())
@click.option("--n", type=click.IntRange(min=1), help="Completions per prompt.")
@click.option("--seed", type=click.IntRange(min=0))
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it has finished.")
@json_option
@click.pass_context
def create_generate(ctx: click.Context, model: str, input_file: str | None, prompts: tuple[str, ...], wait: bool,
                    as_json: bool, **sampling: Any) -> None:
    """Generate completions for prompts or an input file."""
    if bool(prompts) == (input_file is not None):
        raise click.UsageError("give either --prompt (one or more) or --input-file")
    body: dict[str, Any] = {"type": "generate", "model": model,
                            "sampling": {key: value for key, value in sampling.items() if value is not None}}
    if prompts:
        body["prompts"] = list(prompts)
    else:
        body["input_file"] = input_file
    finish(ctx, state(ctx).client.jobs.create(body), as_json, wait)


@jobs.command("list")
@click.option("--type", "kind", type=click.Choice(["train", "finetune", "generate"]))
@click.option("--status", type=click.Choice(["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]))
@json_option
@click.pass_context
def jobs_list(ctx: click.Context, kind: str | None, status: str | None, as_json: bool) -> None:
    """List jobs, newest first."""
    show_all(state(ctx).client.jobs.list(type=kind, status=status), as_json, job_rows)


@jobs.command("get")
@click.argument("job_id")
@json_option
@click.pass_context
def jobs_get(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job."""
    show(state(ctx).client.jobs.get(job_id).raw, as_json)


@jobs.command("cancel")
@click.argument("job_id")
@json_option
@click.pass_context
def jobs_cancel(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Cancel a job (a running one becomes `cancelling` until its worker stops)."""
    job = state(ctx).client.jobs.cancel(job_id)
    if as_json:
        emit(job.raw)
    else:
        click.echo(f"{job.id} {job.status}")


@jobs.command("events")
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Keep printing new events until the job has finished.")
@json_option
@click.pass_context
def jobs_events(ctx: click.Context, job_id: str, follow: bool, as_json: bool) -> None:
    """Print a job's events, oldest first."""
    for event in state(ctx).client.jobs.events(job_id, follow=follow):
        if as_json:
            emit(event.raw)
        else:
            click.echo(f"{event.id:>6} {event.level:<7} {event.type:<10} {event.message}")


@jobs.command("results")
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="A JSONL file to write (default: standard output).")
@json_option
@click.pass_context
def jobs_results(ctx: click.Context, job_id: str, output: Path | None, as_json: bool) -> None:
    """Write a generate job's results as JSONL, one object per prompt, in input order (JSON with or without --json)."""
    client = state(ctx).client
    job = client.jobs.get(job_id)
    if not job.is_terminal:
        click.echo(f"warning: job {job_id} is {job.status}: these are its results so far (the API marks them "
                   "Results-Partial); prompts not done yet are missing", err=True)
    results = client.jobs.results(job_id)
    if output is None:
        for result in results:
            sys.stdout.write(json.dumps(result.raw) + "\n")
        return
    partial = output.with_name(output.name + ".part")
    count = 0
    try:
        with partial.open("w") as out:
            for result in results:
                out.write(json.dumps(result.raw) + "\n")
                count += 1
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    click.echo(f"{output} ({count} results)", err=True)


@jobs.command("watch")
@click.argument("job_id")
@json_option
@click.pass_context
def jobs_watch(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Follow a job with a progress bar until it has finished; exit 0 succeeded, 1 failed, 3 cancelled."""
    done, code = follow(state(ctx).client, job_id, live=state(ctx).progress)
    if as_json:
        emit(done.raw)
    ctx.exit(code)
