"""`gpt2jobs files ...` and `gpt2jobs models ...`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..types import File, Model
from . import cli, emit, json_option, show, show_all, state, table


def file_rows(items: list[File]) -> None:
    table(["id", "purpose", "filename", "bytes", "records", "tokens"],
          [[f.id, f.purpose, f.filename, f.bytes, f.records, f.tokens] for f in items])


def model_rows(items: list[Model]) -> None:
    table(["id", "name", "source", "parameters", "job"], [[m.id, m.name, m.source, m.parameter_count, m.job_id] for m in items])


@cli.group()
def files() -> None:
    """Upload, list, show, download and delete files."""


@files.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--purpose", required=True, type=click.Choice(["train", "generate", "fine-tune", "batch"]),
              help="train (or OpenAI's fine-tune): a training text or JSONL; generate: a generation input JSONL; "
                   "batch: OpenAI batch request lines.")
@json_option
@click.pass_context
def files_upload(ctx: click.Context, path: Path, purpose: str, as_json: bool) -> None:
    """Upload a file."""
    uploaded = state(ctx).client.files.upload(path, purpose)
    if as_json:
        emit(uploaded.raw)
    else:
        file_rows([uploaded])


@files.command("list")
@click.option("--purpose", type=click.Choice(["train", "generate", "fine-tune", "batch", "batch_output"]),
              help="Only files of this purpose.")
@json_option
@click.pass_context
def files_list(ctx: click.Context, purpose: str | None, as_json: bool) -> None:
    """List files, newest first."""
    show_all(state(ctx).client.files.list(purpose=purpose), as_json, file_rows)


@files.command("get")
@click.argument("file_id")
@json_option
@click.pass_context
def files_get(ctx: click.Context, file_id: str, as_json: bool) -> None:
    """Show a file."""
    show(state(ctx).client.files.get(file_id).raw, as_json)


@files.command("download")
@click.argument("file_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the file's bytes (default: standard output).")
@json_option
@click.pass_context
def files_download(ctx: click.Context, file_id: str, output: Path | None, as_json: bool) -> None:
    """Download a file's content, as uploaded."""
    content = state(ctx).client.files.content(file_id)
    if output is None:
        sys.stdout.buffer.write(content)
        sys.stdout.flush()
        return
    output.write_bytes(content)
    if as_json:
        emit({"id": file_id, "path": str(output), "bytes": len(content)})
    else:
        click.echo(f"{output} ({len(content)} bytes)")


@files.command("delete")
@click.argument("file_id")
@json_option
@click.pass_context
def files_delete(ctx: click.Context, file_id: str, as_json: bool) -> None:
    """Delete a file."""
    deleted = state(ctx).client.files.delete(file_id)
    if as_json:
        emit(deleted.raw)
    else:
        click.echo(f"deleted {deleted.id}")


@cli.group()
def models() -> None:
    """Import, list, show, download and delete models."""


@models.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="The model's name (default: the archive's name without its suffix).")
@json_option
@click.pass_context
def models_import(ctx: click.Context, path: Path, name: str | None, as_json: bool) -> None:
    """Import a Hugging Face format GPT-2 archive (.tar, .tar.gz/.tgz or .zip)."""
    model = state(ctx).client.models.upload(path, name=name)
    if as_json:
        emit(model.raw)
    else:
        model_rows([model])


@models.command("list")
@json_option
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """List models, newest first."""
    show_all(state(ctx).client.models.list(), as_json, model_rows)


@models.command("get")
@click.argument("model_id")
@json_option
@click.pass_context
def models_get(ctx: click.Context, model_id: str, as_json: bool) -> None:
    """Show a model."""
    show(state(ctx).client.models.get(model_id).raw, as_json)


@models.command("download")
@click.argument("model_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="A file, or a folder to write <model_id>.tar.gz in.")
@json_option
@click.pass_context
def models_download(ctx: click.Context, model_id: str, output: Path, as_json: bool) -> None:
    """Download a model (Hugging Face format, .tar.gz)."""
    path = state(ctx).client.models.download(model_id, output)
    if as_json:
        emit({"id": model_id, "path": str(path), "bytes": path.stat().st_size})
    else:
        click.echo(str(path))


@models.command("delete")
@click.argument("model_id")
@json_option
@click.pass_context
def models_delete(ctx: click.Context, model_id: str, as_json: bool) -> None:
    """Delete a model."""
    deleted = state(ctx).client.models.delete(model_id)
    if as_json:
        emit(deleted.raw)
    else:
        click.echo(f"deleted {deleted.id}")
