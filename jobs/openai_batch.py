"""OpenAI's batch input format, for /v1/completions: the one reader of files with purpose "batch".

Each non-blank line is one request::

    {"custom_id": "q1", "method": "POST", "url": "/v1/completions",
     "body": {"model": "model-...", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.7}}

:func:`read_batch_file` reads a whole file, the same way every time, and is called in three places, so that what is
accepted is what runs:

* **At upload** (purpose "batch": jobs.uploads through :func:`check_batch_file`) the file must be readable as batch
  input at all; the first line that is not is refused with ``400 invalid_file`` naming it, as for every other
  file: bytes that are not UTF-8, a line that is not a JSON object (or has a key twice), a ``custom_id`` that is
  missing, not a string, not 1 to 255 characters without control characters, or used by an earlier line (each
  output line names its request by it: a request without a unique id could never be answered), and a file
  without any request. What a request asks for is not judged here (OpenAI's upload does not either).
* **On POST /v1/batches** (jobs.batches) every request is judged, and every problem of every line is reported with
  its line and param (up to MAX_PROBLEMS, then one entry counting the rest) as the batch's ``errors``; a batch with
  any is stored as failed and nothing runs. Here: ``method`` POST, ``url`` /v1/completions, the ``body`` (below),
  one model for every line (OpenAI's rule: :func:`read_batch_file`), and, with the database (jobs.batches), that
  the model is a registered model of the caller's and that each ``max_tokens`` leaves room in its context.
* **In the worker** (workers.generation.load_items picks this reader for an input file with purpose "batch") the
  same read gives each request's prompt and sampling; a file with problems fails its job with ``invalid_file``
  (only a generate job submitted through /v1/jobs with a batch file can get there: a failed batch has no job).

The body, OpenAI's completions parameters -> jobs.specs.Sampling (which then checks the values, as for any job):
``max_tokens`` -> max_new_tokens (default 16, OpenAI's completions default, when absent or null);
``temperature`` (OpenAI's range, 0 to 2), ``top_p``, ``n``, ``seed`` -> the same; ``stop``, a string or a list
of up to 4 -> stop; vLLM's extensions ``top_k`` and ``repetition_penalty`` -> the same. A null value is the
parameter's default. ``echo`` false, ``logprobs`` null, ``best_of`` 1, ``frequency_penalty`` 0,
``presence_penalty`` 0, ``stream`` false, ``suffix`` null, ``logit_bias`` {} and ``stream_options`` null change
nothing and are accepted, as is ``user`` (any string); any other value of those, and any other key, is an
unsupported parameter: never silently dropped. ``prompt`` is one string (any text, NUL included); a list of
prompts or of token ids is refused with a message saying what to send instead.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydantic import ValidationError

from gpt2core.corpus import CorpusError, DuplicateKey, is_blank, iter_lines, unique_keys, unpaired_surrogate
from jobs.models import NAME_LENGTH
from jobs.readers import FileRejected, json_number
from jobs.specs import Sampling
from jobs.text import check_name

#: The endpoints a batch's requests may go to (the batch's `endpoint`, and each line's `url`).
SUPPORTED_ENDPOINTS = ("/v1/completions",)
#: OpenAI's default max_tokens for completions.
DEFAULT_MAX_TOKENS = 16
#: OpenAI's temperature range (ours goes to 5 for jobs; a batch keeps to OpenAI's).
MAX_TEMPERATURE = 2
#: Problems reported one by one; past this many, one more entry counts the rest.
MAX_PROBLEMS = 100
LINE_FIELDS = ("custom_id", "method", "url", "body")
#: OpenAI's completions parameters (and vLLM's extensions) that sampling takes, and the Sampling field of each.
SAMPLING_PARAMETERS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "n": "n",
                       "stop": "stop", "seed": "seed", "top_k": "top_k", "repetition_penalty": "repetition_penalty"}
OPENAI_NAMES = {ours: theirs for theirs, ours in SAMPLING_PARAMETERS.items()}


#: Parameters accepted only with a value that changes nothing: those values (null always), and how messages say them.
NO_OP_PARAMETERS: dict[str, tuple[tuple[Any, ...], str]] = {
    "echo": ((False,), "false"),
    "logprobs": ((), "null"),
    "best_of": ((1,), "1"),
    "frequency_penalty": ((0,), "0"),
    "presence_penalty": ((0,), "0"),
    "stream": ((False,), "false"),
    "suffix": ((), "null"),
    "logit_bias": (({},), "{} or null"),
    "stream_options": ((), "null"),
}


def is_no_op(name: str, value: Any) -> bool:
    """Whether `value` of the no-op parameter `name` changes nothing: null, or one of its values, compared as JSON
    compares them (0 and 0.0 alike, but false is not 0)."""
    def same(allowed: Any) -> bool:
        if isinstance(allowed, bool) or isinstance(value, bool):
            return value is allowed
        if isinstance(allowed, (int, float)):
            return isinstance(value, (int, float)) and value == allowed
        return type(value) is type(allowed) and value == allowed

    return value is None or any(same(allowed) for allowed in NO_OP_PARAMETERS[name][0])


BODY_KEYS = ("model", "prompt", "user", *SAMPLING_PARAMETERS, *NO_OP_PARAMETERS)


@dataclass(frozen=True)
class BatchProblem:
    """Why one request of a batch file cannot run: OpenAI's batch error (code, message, param, line)."""

    line: int | None
    code: str
    message: str
    param: str | None

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class BatchRequest:
    """One request line: its position among the requests, its line, id, model, prompt and sampling (None where
    the line has a problem that makes them unusable)."""

    index: int
    line: int
    custom_id: str
    model: str | None
    prompt: str | None
    sampling: Sampling | None


@dataclass
class BatchInput:
    """A batch file read whole: its requests in order and what is wrong with them (at most MAX_PROBLEMS kept;
    `more_problems` counts the others)."""

    requests: list[BatchRequest] = field(default_factory=list)
    problems: list[BatchProblem] = field(default_factory=list)
    more_problems: int = 0

    @property
    def model(self) -> str | None:
        """The model the requests name (the first line's: every other must name the same)."""
        return next((request.model for request in self.requests if request.model is not None), None)

    def report(self, problem: BatchProblem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more_problems += 1

    def errors(self) -> list[dict[str, Any]]:
        """The problems as OpenAI's batch errors, with a last entry counting those not listed."""
        errors = [problem.as_error() for problem in self.problems]
        if self.more_problems:
            errors.append({"code": "too_many_errors", "message": f"{self.more_problems} more problem"
                           f"{'s' * (self.more_problems != 1)} not listed (the first {MAX_PROBLEMS} are above)",
                           "param": None, "line": None})
        return errors


def read_batch_file(stream: BinaryIO, filename: str) -> BatchInput:
    """The whole batch file: every request, and every problem of every line (see the module docstring).
    FileRejected at the first line that makes the file unreadable as batch input."""
    read = BatchInput()
    seen: dict[str, int] = {}
    try:
        for number, line in iter_lines(stream):
            if is_blank(line):
                continue
            record = parse_line(line, number)
            custom_id = record.get("custom_id")
            if not isinstance(custom_id, str):
                raise CorpusError(number, "needs a string 'custom_id' (each output line names its request by it)")
            problem = check_name(custom_id, "custom_id", NAME_LENGTH)
            if problem:
                raise CorpusError(number, problem)
            if custom_id in seen:
                raise CorpusError(number, f"repeats custom_id {custom_id!r} from line {seen[custom_id]}")
            seen[custom_id] = number
            read.requests.append(_request(record, number, len(read.requests), custom_id, read))
    except CorpusError as exc:
        raise FileRejected(filename, exc.line, exc.reason) from None
    if not read.requests:
        raise FileRejected(filename, None, "the file holds no requests")
    return read


def check_batch_file(stream: BinaryIO, filename: str) -> int:
    """The upload check of a batch file: read_batch_file, refusing only a file unreadable as batch input (its
    requests' own problems are reported when a batch is created from it); the number of requests."""
    return len(read_batch_file(stream, filename).requests)


def iter_batch_requests(stream: BinaryIO, filename: str) -> Iterator[BatchRequest]:
    """The requests of a batch file whose requests are all valid (what a worker runs); FileRejected naming the
    first problem otherwise."""
    read = read_batch_file(stream, filename)
    if read.problems:
        first = read.problems[0]
        more = len(read.problems) + read.more_problems - 1
        raise FileRejected(filename, first.line, first.message + (f" (and {more} more problems)" if more else ""))
    yield from read.requests


def parse_line(line: str, number: int) -> dict[str, Any]:
    """The JSON object on one line (gpt2core.corpus.parse_json_line's rules), a number written with a fraction or an
    exponent whose value is whole read as an integer (jobs.readers.json_number: JSON Schema's integers, which is
    how OpenAI reads `"n": 2.0`)."""
    try:
        record = json.loads(line, object_pairs_hook=unique_keys, parse_float=json_number)
    except DuplicateKey as exc:
        raise CorpusError(number, f"key {exc.key!r} appears twice in one object") from None
    except json.JSONDecodeError as exc:
        raise CorpusError(number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError):
        raise CorpusError(number, "invalid JSON: too large or too deeply nested") from None
    if not isinstance(record, dict):
        raise CorpusError(number, f"expected a JSON object, got {type(record).__name__}")
    return record


def _request(record: dict[str, Any], number: int, index: int, custom_id: str, read: BatchInput) -> BatchRequest:
    def problem(code: str, param: str | None, message: str) -> None:
        read.report(BatchProblem(number, code, message, param))

    for key in sorted(set(record) - set(LINE_FIELDS)):
        problem("unsupported_parameter", key, f"{_shown(key)} is not a field of a batch request (allowed: "
                f"{', '.join(LINE_FIELDS)})")
    method, url, body = record.get("method"), record.get("url"), record.get("body")
    if method != "POST":
        problem("invalid_method", "method", f"method must be \"POST\", got {_json(method)}")
    if url not in SUPPORTED_ENDPOINTS:
        problem("invalid_url", "url", f"url must be {' or '.join(SUPPORTED_ENDPOINTS)} (the endpoint batches run "
                f"here), got {_json(url)}")
    if not isinstance(body, dict):
        problem("missing_required_parameter" if body is None else "invalid_value", "body",
                f"body must be a JSON object (the request's parameters), got {_json(body)}")
        return BatchRequest(index, number, custom_id, None, None, None)

    for key in sorted(set(body) - set(BODY_KEYS)):
        problem("unsupported_parameter", f"body.{key}", f"body.{_shown(key)} is not a supported parameter "
                f"(supported: model, prompt, {', '.join(SAMPLING_PARAMETERS)}, user)")
    for name, (_, value) in NO_OP_PARAMETERS.items():
        if name in body and not is_no_op(name, body[name]):
            problem("unsupported_parameter", f"body.{name}", f"body.{name} {_json(body[name])} is not supported: "
                    f"only {value} (which changes nothing) is accepted")
    if body.get("user") is not None and not isinstance(body["user"], str):
        problem("invalid_value", "body.user", f"body.user must be a string, got {_json(body['user'])}")

    model = body.get("model")
    if model is None:
        problem("missing_required_parameter", "body.model", "body.model is required: the id of a registered model "
                "of yours (model-...)")
    elif not isinstance(model, str) or check_name(model, "body.model", NAME_LENGTH):
        why = check_name(model, "body.model", NAME_LENGTH) if isinstance(model, str) else None
        problem("invalid_value", "body.model", why or f"body.model must be a string, got {_json(model)}")
        model = None
    elif read.model is not None and model != read.model:
        first = next(r for r in read.requests if r.model is not None)
        problem("mismatched_model", "body.model", f"every request of a batch must name the same model: this one "
                f"names {model!r}, line {first.line} names {read.model!r}")

    return BatchRequest(index, number, custom_id, model, _prompt(body, problem), _sampling(body, problem))


def _prompt(body: dict[str, Any], problem) -> str | None:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        at = unpaired_surrogate(prompt)
        if at is None:
            return prompt
        problem("invalid_value", "body.prompt", f"body.prompt has an unpaired surrogate (U+{ord(prompt[at]):04X}) "
                f"at character {at}; it is not text")
    elif prompt is None:
        problem("missing_required_parameter", "body.prompt", "body.prompt is required: the text to complete")
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) or
                                                     isinstance(p, list) for p in prompt):
        problem("unsupported_parameter", "body.prompt", "body.prompt as token ids is not supported: send the "
                "prompt as a string")
    elif isinstance(prompt, list):
        problem("unsupported_parameter", "body.prompt", "body.prompt as a list of prompts is not supported: write "
                "one request line per prompt, each with its own custom_id")
    else:
        problem("invalid_value", "body.prompt", f"body.prompt must be a string, got {_json(prompt)}")
    return None


def _sampling(body: dict[str, Any], problem) -> Sampling | None:
    """The request's sampling: every parameter it sets (null: the default), max_new_tokens always (16 unless
    given), so a worker merges exactly these over the job's."""
    given: dict[str, Any] = {"max_new_tokens": DEFAULT_MAX_TOKENS}
    for theirs, ours in SAMPLING_PARAMETERS.items():
        value = body.get(theirs)
        if value is None:
            continue
        if theirs == "stop" and isinstance(value, str):
            value = [value]
        given[ours] = value
    temperature = given.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > MAX_TEMPERATURE:
        problem("invalid_value", "body.temperature", f"body.temperature must be from 0 to {MAX_TEMPERATURE} "
                f"(OpenAI's range), got {temperature}")
        return None
    try:
        return Sampling.model_validate(given)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = OPENAI_NAMES.get(str(error["loc"][0]), str(error["loc"][0])) if error["loc"] else "body"
            message = error["msg"].removeprefix("Value error, ")
            if name == "stop" and len(error["loc"]) > 1:
                message = f"item {error['loc'][1]}: {message}"
            problem("invalid_value", f"body.{name}", f"body.{name}: {message}")
        return None


def _json(value: Any) -> str:
    """A value as JSON, shortened for a message."""
    text = json.dumps(value) if value is not None else "null"  # ASCII: any text, even unpaired surrogates
    return text if len(text) <= 80 else text[:77] + "..."


def _shown(key: str) -> str:
    """A key for a message: itself when it is a short name, else as a JSON string, shortened."""
    if check_name(key, "key", 64) is None:
        return key
    return _json(key)
