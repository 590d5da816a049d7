"""`gpt2jobs`: the command line on gpt2jobs_client (click, and rich for the live progress bar).

    gpt2jobs files upload corpus.txt --purpose train
    gpt2jobs jobs create train --training-file file-... --max-steps 2000 --wait
    gpt2jobs jobs list --json

Exit codes: 0 success (a waited-for job succeeded); 1 an API error, or a job that failed; 2 no answer from the API
(or a bad command line); 3 a job that was cancelled; 4 a waited-for job that is paused (it will not finish until it
is resumed: `gpt2jobs jobs resume JOB_ID`).
"""
from __future__ import annotations

import math

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from ..client import Client
from ..errors import APIConnectionError, APIError

EXIT_OK, EXIT_FAILED, EXIT_NO_ANSWER, EXIT_CANCELLED, EXIT_PAUSED = 0, 1, 2, 3, 4

EPILOG = """\b
Exit codes:
  0  success (with --wait or watch: the job succeeded)
  1  the API answered with an error (its message is printed), or the job failed
  2  no answer from the API (or a bad command line)
  3  the job was cancelled
  4  (with --wait or watch) the job is paused: it waits for `jobs resume`"""


class State:
    """What the global options chose; the Client is made on first use."""

    def __init__(self, api_url: str | None, api_key: str | None, progress: bool):
        self.api_url, self.api_key, self.progress = api_url, api_key, progress
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.api_url, self.api_key)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class Group(click.Group):
    """A group whose commands' API errors become a message on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except APIError as error:
            where = f" (param: {error.param})" if error.param else ""
            click.echo(f"error: {error.message}{where} [{error.status} {error.code}]", err=True)
            ctx.exit(EXIT_FAILED)
        except APIConnectionError as error:
            click.echo(f"error: no answer from the API: {error}", err=True)
            ctx.exit(EXIT_NO_ANSWER)
        except OSError as error:  # a local file: -o into a folder that does not exist, a full disk, ...
            where = f": {error.filename}" if error.filename else ""
            click.echo(f"error: {error.strerror or error}{where}", err=True)
            ctx.exit(EXIT_FAILED)


class FiniteFloat(click.ParamType):
    """A finite number (JSON has no NaN or infinity), optionally at least `low`."""

    name = "number"

    def __init__(self, low: float | None = None):
        self.low = low

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and number < self.low:
            self.fail(f"{value!r} is below {self.low:g}", param, ctx)
        return number


class OrAuto(click.ParamType):
    """The word "auto" (the server's worker picks the value: a hyperparameter that accepts "auto"), or a value of
    `inner` (FiniteFloat(), click.IntRange(min=1), ...)."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = f"{inner.name}|auto"

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return "[NUMBER|auto]" if isinstance(self.inner, (FiniteFloat, click.FloatRange)) else "[INTEGER|auto]"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return self.inner.convert(value, param, ctx)
        except click.BadParameter as error:
            self.fail(f'{error.message} (or "auto")', param, ctx)


def json_option(function: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print the API's JSON object (a JSON line per item for lists).")(function)


def state(ctx: click.Context) -> State:
    return ctx.ensure_object(State)


def emit(raw: dict[str, Any]) -> None:
    click.echo(json.dumps(raw))


def emit_all(raws: Iterable[dict[str, Any]]) -> None:
    for raw in raws:
        emit(raw)


def show(raw: dict[str, Any], as_json: bool) -> None:
    """One object: the API's JSON with --json, else a `key: value` line per field."""
    if as_json:
        emit(raw)
    else:
        fields(raw)


def show_all(items: Iterable[Any], as_json: bool, rows: Callable[[list[Any]], None]) -> None:
    """A list of typed objects: a JSON line per item with --json (streamed page by page), else `rows(items)`."""
    if as_json:
        emit_all(item.raw for item in items)
    else:
        rows(list(items))


def size(count: int | None) -> str | None:
    """Bytes as "466.3 kB" (powers of 1000, as the README and the dashboard write sizes)."""
    if count is None:
        return None
    value, units = float(count), ["B", "kB", "MB", "GB", "TB"]
    unit = 0
    while value >= 1000 and unit < len(units) - 1:
        value, unit = value / 1000, unit + 1
    return f"{count} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Left-aligned columns, as wide as their widest cell."""
    cells = [[str(h).upper() for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def fields(raw: dict[str, Any], skip: Sequence[str] = ("object",)) -> None:
    """One `key: value` line per field (JSON for nested values)."""
    for key, value in raw.items():
        if key not in skip:
            click.echo(f"{key}: {value if isinstance(value, (str, int, float)) else json.dumps(value)}")


@click.group(cls=Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--api-url", envvar="GPT2JOBS_API_URL", help="The API's base URL (default $GPT2JOBS_API_URL, else http://127.0.0.1:8000).")
@click.option("--api-key", envvar="GPT2JOBS_API_KEY", help="The API key (default $GPT2JOBS_API_KEY).")
@click.option("--no-progress", is_flag=True, help="Print a line per progress change instead of a live progress bar.")
@click.pass_context
def cli(ctx: click.Context, api_url: str | None, api_key: str | None, no_progress: bool) -> None:
    """Train, fine-tune and generate with GPT-2 models on a gpt2-jobs API."""
    ctx.obj = State(api_url, api_key, progress=not no_progress)
    ctx.call_on_close(ctx.obj.close)


def main() -> None:
    cli(prog_name="gpt2jobs")


from . import files_models, jobs  # noqa: E402, F401  (registers the commands on `cli`)
