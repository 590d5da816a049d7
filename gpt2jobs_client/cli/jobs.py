"""`gpt2jobs jobs ...`: create (train, finetune, generate), list, get, cancel, pause, resume, events, checkpoints,
register-checkpoint, results, watch."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..types import Checkpoint, Job
from . import FiniteFloat, OrAuto, cli, emit, json_option, show, show_all, size, state, table
from .progress import follow


def job_summary(job: Job) -> str:
    p = job.progress
    if job.type == "generate":
        return f"{(p.get('completed') or 0) + (p.get('failed') or 0)}/{p.get('total')}"
    return f"{p.get('step', 0)}/{p.get('total_steps')}"


def job_rows(items: list[Job]) -> None:
    table(["id", "type", "status", "progress", "model"],
          [[j.id, j.type, j.status, job_summary(j), j.model if isinstance(j.model, str) else json.dumps(j.model)] for j in items])


def finish(ctx: click.Context, job: Job, as_json: bool, wait: bool, line: str | None = None) -> None:
    """Print the job (`line`, default "<id> <status> (<type>)"; with --json and `wait`: once it has finished); with
    `wait`, follow it to its end and exit with its code."""
    if not as_json:
        click.echo(line if line is not None else f"{job.id} {job.status} ({job.type})")
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
    """Create, list, show, cancel, pause, resume and follow jobs; their checkpoints."""


@jobs.group("create")
def create() -> None:
    """Submit a train, finetune or generate job."""


def training_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--training-file", required=True, help="A file id with purpose train."),
        click.option("--validation-file", help="A file id with purpose train."),
        click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (not with --epochs)."),
        click.option("--epochs", type=OrAuto(FiniteFloat()),
                     help='Passes over the data (not with --max-steps); "auto": from the dataset\'s size.'),
        click.option("--batch-size", type=OrAuto(click.IntRange(min=1)),
                     help='Windows per micro-batch (a step is batch size x grad-accum-steps windows, split across '
                          'the devices); "auto": the worker picks it (and the gradient accumulation).'),
        click.option("--grad-accum-steps", type=click.IntRange(1, 1024),
                     help="Micro-batches per optimizer step (default 1)."),
        click.option("--learning-rate", type=OrAuto(FiniteFloat()),
                     help='Peak learning rate; "auto": by method and model size.'),
        click.option("--eval-every", type=click.IntRange(min=0), help="Steps between evaluations (0: never)."),
        click.option("--early-stopping-patience", type=click.IntRange(min=0),
                     help="Stop after this many evaluations in a row without a lower validation loss (0: never)."),
        click.option("--select-model", type=click.Choice(["last", "best"]),
                     help="The model the job registers: the last step's, or the best validation loss's checkpoint."),
        click.option("--suffix", help="Appended to the output model's name."),
        click.option("--seed", type=click.IntRange(min=0)),
        click.option("--devices", type=click.IntRange(1, 16), help="Train on this many devices at once (the GPUs "
                     "of one worker, data-parallel); the batch stays global and must split evenly across them."),
        click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it has finished (or is paused)."),
        json_option,
        click.pass_context,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def submit_training(ctx: click.Context, kind: str, model: Any, options: dict[str, Any],
                    method: dict[str, Any] | None = None) -> None:
    if options["max_steps"] is not None and options["epochs"] is not None:
        raise click.UsageError("--max-steps and --epochs are mutually exclusive")
    hyperparameters = {key: value for key, value in {
        "max_steps": options["max_steps"], "n_epochs": options["epochs"], "batch_size": options["batch_size"],
        "grad_accum_steps": options["grad_accum_steps"],
        "learning_rate": options["learning_rate"], "eval_every": options["eval_every"],
        "early_stopping_patience": options["early_stopping_patience"],
        "select_model": options["select_model"]}.items() if value is not None}
    body: dict[str, Any] = {"type": kind, "training_file": options["training_file"], "hyperparameters": hyperparameters}
    for key in ("validation_file", "suffix", "seed", "devices"):
        if options[key] is not None:
            body[key] = options[key]
    if model is not None:
        body["model"] = model
    if method is not None:
        body["method"] = method
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
@click.option("--lora-rank", type=click.IntRange(1, 256),
              help="Fine-tune with LoRA adapters of this rank (method lora) instead of every weight (method full).")
@click.option("--lora-alpha", type=FiniteFloat(), help="LoRA's alpha (the adapters' update is scaled by alpha / "
              "rank; default 16). Needs --lora-rank.")
@training_options
def create_finetune(ctx: click.Context, model: str, lora_rank: int | None, lora_alpha: float | None,
                    **options: Any) -> None:
    """Fine-tune a registered model (every weight, or LoRA adapters with --lora-rank)."""
    method: dict[str, Any] | None = None
    if lora_rank is not None:
        method = {"type": "lora", "rank": lora_rank}
        if lora_alpha is not None:
            method["alpha"] = lora_alpha
    elif lora_alpha is not None:
        raise click.UsageError("--lora-alpha needs --lora-rank")
    submit_training(ctx, "finetune", model, options, method)


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
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it has finished (or is paused).")
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
@click.option("--status", type=click.Choice(["queued", "running", "pausing", "paused", "cancelling", "succeeded",
                                             "failed", "cancelled"]))
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
    """Cancel a job (a running or pausing one becomes `cancelling` until its worker stops)."""
    job = state(ctx).client.jobs.cancel(job_id)
    if as_json:
        emit(job.raw)
    else:
        click.echo(f"{job.id} {job.status}")


@jobs.command("pause")
@click.argument("job_id")
@json_option
@click.pass_context
def jobs_pause(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Pause a job: a queued one is paused at once, a running one is `pausing` until its worker has written a
    checkpoint (or stored the prompts in progress), then `paused`. Resume it with `jobs resume`."""
    job = state(ctx).client.jobs.pause(job_id)
    if as_json:
        emit(job.raw)
    else:
        click.echo(f"{job.id} {job.status}")


@jobs.command("resume")
@click.argument("job_id")
@click.option("--devices", type=click.IntRange(1, 16), help="Continue a training job on this many devices (the "
              "same global batch, split across them).")
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it has finished (or is paused "
              "again).")
@json_option
@click.pass_context
def jobs_resume(ctx: click.Context, job_id: str, devices: int | None, wait: bool, as_json: bool) -> None:
    """Resume a paused job: queued again, it continues from its checkpoint (or with the prompts not done yet)."""
    job = state(ctx).client.jobs.resume(job_id, devices=devices)
    finish(ctx, job, as_json, wait, line=f"{job.id} {job.status}")


@jobs.command("events")
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Keep printing new events until the job has finished or is paused.")
@json_option
@click.pass_context
def jobs_events(ctx: click.Context, job_id: str, follow: bool, as_json: bool) -> None:
    """Print a job's events, oldest first."""
    for event in state(ctx).client.jobs.events(job_id, follow=follow):
        if as_json:
            emit(event.raw)
        else:
            click.echo(f"{event.id:>6} {event.level:<7} {event.type:<10} {event.message}")


def metric(value: float | None, form: str = "{:.4f}") -> str | None:
    return None if value is None else form.format(value)


def checkpoint_rows(items: list[Checkpoint]) -> None:
    table(["id", "step", "train loss", "val loss", "perplexity", "accuracy", "size"],
          [[c.id, c.step, metric(c.train_loss), metric(c.val_loss), metric(c.val_perplexity, "{:.2f}"),
            metric(c.val_accuracy, "{:.2%}"), size(c.bytes)] for c in items])


@jobs.command("checkpoints")
@click.argument("job_id")
@json_option
@click.pass_context
def jobs_checkpoints(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """List a training job's checkpoints, by step: training loss and, at evaluation steps, validation loss,
    perplexity and token accuracy (- where the step had no evaluation)."""
    show_all(state(ctx).client.jobs.checkpoints(job_id), as_json, checkpoint_rows)


@jobs.command("register-checkpoint")
@click.argument("job_id")
@click.argument("checkpoint_id")
@click.option("--name", help='The model\'s name (default: the job\'s model name with "@step-<step>").')
@json_option
@click.pass_context
def jobs_register_checkpoint(ctx: click.Context, job_id: str, checkpoint_id: str, name: str | None,
                             as_json: bool) -> None:
    """Register one of a job's checkpoints as a model (whatever the job's status); print the model's id. The same
    checkpoint registered again gives the model it made the first time."""
    model = state(ctx).client.jobs.register_checkpoint(job_id, checkpoint_id, name=name)
    if as_json:
        emit(model.raw)
    else:
        click.echo(model.id)


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
    """Follow a job with a progress bar until it has finished or is paused; exit 0 succeeded, 1 failed,
    3 cancelled, 4 paused (it waits for `jobs resume`)."""
    done, code = follow(state(ctx).client, job_id, live=state(ctx).progress)
    if as_json:
        emit(done.raw)
    ctx.exit(code)
