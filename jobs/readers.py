"""One reader per file format, used by the upload check and by the workers alike.

A file is read the same way, line for line, when it is uploaded and when a job runs on it: the upload check is
simply a full read that keeps nothing. The line rules (UTF-8, a leading BOM dropped, lines end at "\\n" only, CRLF
read as LF, a lone CR is content) are gpt2core.corpus's, the very functions training reads files with; see the
README's "File formats".

* Training files: plain UTF-8 text (one document), or JSONL (by purpose and name: :func:`training_file_is_jsonl`) with a string
  "text", or a string "prompt" and a string "completion", on every line (gpt2core.corpus.training_record: one
  rule for the upload check and for training).
* Generation files: JSONL, one ``{"custom_id": str, "prompt": str, "sampling": {...}}`` object per line
  (`sampling` optional: overrides of the job's sampling for that line). custom_ids are unique, 1 to 255
  characters without control characters; prompts are any text (NUL included) without unpaired surrogates.
"""
from __future__ import annotations

from collections.abc import Iterator
import json
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, BinaryIO

from pydantic import ValidationError

# gpt2core.corpus imports neither torch nor numpy (a test keeps it so): the API runs without torch.
from gpt2core.corpus import (
    CorpusError,
    DuplicateKey,
    check_text,
    is_blank,
    iter_training_records,
    iter_lines,
    iter_text,
    parse_json_line,
    unique_keys,
)
from jobs.errors import InvalidInput
from jobs.models import NAME_LENGTH
from jobs.specs import Sampling
from jobs.text import check_name

#: A training file with one of these suffixes is JSONL ({"text": ...} per line); any other is plain text.
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
GENERATION_FIELDS = ("custom_id", "prompt", "sampling")


def json_number(text: str) -> int | float:
    """A JSON number written with a fraction or an exponent: an int when its value is whole, as JSON Schema (and
    so the OpenAPI document) counts 2.0 and 1e3 as integers; else a float. Exact: "0.99999999999999999999" is not
    whole even though it rounds to the float 1.0. Infinite values stay floats (and are refused as such)."""
    value = float(text)
    if math.isfinite(value):
        exact = Decimal(text)
        if exact == exact.to_integral_value():
            return int(exact)
    return value


def parse_json_body(raw: bytes) -> Any:
    """A JSON request body, read by the rules of the file readers: UTF-8, no key twice in one object; a whole
    number is an integer however it is written (json_number). Raises InvalidInput (param "body") saying what is
    wrong."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys, parse_float=json_number)
    except DuplicateKey as exc:
        raise InvalidInput(f"body: key {exc.key!r} appears twice in one object", param="body") from None
    except UnicodeDecodeError:
        raise InvalidInput("body: the request body is not UTF-8", param="body") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"body: not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})",
                           param="body") from None
    except RecursionError:
        raise InvalidInput("body: not valid JSON: nested too deeply", param="body") from None
    except ValueError:  # an integer of over 4300 digits
        raise InvalidInput("body: a number has more than 4,300 digits", param="body") from None


def is_jsonl(filename: str) -> bool:
    return filename.lower().endswith(JSONL_SUFFIXES)


def training_file_is_jsonl(purpose: str, filename: str) -> bool:
    """Whether a training file is read as JSONL: every "fine-tune" file (OpenAI's fine-tuning files are JSONL
    whatever their name, and the `openai` SDK names bytes it uploads "upload"), and a "train" file named
    *.jsonl, *.ndjson or *.json (any other "train" file is plain text). The upload check and training both ask
    this."""
    return purpose == "fine-tune" or is_jsonl(filename)


class FileRejected(InvalidInput):
    """A file that breaks its format's rules; the message names the file and line."""

    code = "invalid_file"

    def __init__(self, filename: str, line: int | None, reason: str) -> None:
        where = f"{filename}: line {line}" if line is not None else filename
        super().__init__(f"{where}: {reason}", param="file")
        self.line = line


@dataclass(frozen=True)
class GenerationItem:
    """One line of a generation file: its position among the prompts, its id, prompt and sampling overrides."""

    index: int
    line: int
    custom_id: str
    prompt: str
    sampling: Sampling | None


def read_generation_file(stream: BinaryIO, filename: str) -> Iterator[GenerationItem]:
    """The items of a generation file in order; FileRejected at the first line that breaks the rules."""
    seen: dict[str, int] = {}
    try:
        for number, line in iter_lines(stream):
            if is_blank(line):
                continue
            record = parse_json_line(line, number)
            item = _generation_item(record, number, len(seen), filename)
            if item.custom_id in seen:
                raise FileRejected(filename, number, f"repeats custom_id {item.custom_id!r} from line "
                                   f"{seen[item.custom_id]}")
            seen[item.custom_id] = number
            yield item
    except CorpusError as exc:
        raise FileRejected(filename, exc.line, exc.reason) from None
    if not seen:
        raise FileRejected(filename, None, "the file holds no prompts")


def _generation_item(record: dict, number: int, index: int, filename: str) -> GenerationItem:
    unknown = sorted(set(record) - set(GENERATION_FIELDS))
    if unknown:
        raise FileRejected(filename, number, f"unknown field {unknown[0]!r} (allowed: {', '.join(GENERATION_FIELDS)})")
    custom_id, prompt = record.get("custom_id"), record.get("prompt")
    if not isinstance(custom_id, str):
        raise FileRejected(filename, number, "needs a string 'custom_id'")
    problem = check_name(custom_id, "custom_id", NAME_LENGTH)
    if problem:
        raise FileRejected(filename, number, problem)
    if not isinstance(prompt, str):
        raise FileRejected(filename, number, "needs a string 'prompt'")
    check_text(prompt, number, "prompt")
    sampling = None
    if "sampling" in record:
        try:
            sampling = Sampling.model_validate(record["sampling"])
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(["sampling", *(str(p) for p in first["loc"])])
            raise FileRejected(filename, number, f"{field}: {first['msg']}") from None
    return GenerationItem(index, number, custom_id, prompt, sampling)


def check_generation_file(stream: BinaryIO, filename: str) -> int:
    """Read a whole generation file as a job would; the number of prompts, or FileRejected."""
    return sum(1 for _ in read_generation_file(stream, filename))


def read_training_file(stream: BinaryIO, filename: str, count_tokens: bool = False, *,
                       jsonl: bool | None = None) -> tuple[int, int | None]:
    """Read a whole training file as training would (gpt2core.corpus), in one pass: (documents, tokens), tokens
    only when `count_tokens` (GPT-2 BPE of each document plus its end-of-text token, gpt2core.data's rule; for a
    prompt/completion record, the prompt's tokens and the completion's, each tokenized alone, plus the EOT: the
    prompt's count as tokens too, though they are not loss targets).

    `jsonl`: read as JSONL or as plain text (default: by the file name; training_file_is_jsonl says it for a
    stored file). FileRejected for a line that breaks the rules, and for a file without any text (training would
    have no tokens)."""
    encode = _token_counter() if count_tokens else None
    documents, tokens = 0, 0
    try:
        if is_jsonl(filename) if jsonl is None else jsonl:
            for record in iter_training_records(stream):
                if not record.empty:
                    documents += 1
                    # prompt and completion are tokenized separately (gpt2core.data), "" making no tokens
                    tokens += encode(record.prompt) + encode(record.completion) + 1 if encode else 0
        else:
            pieces = [text for text in iter_text(stream) if text]  # read to the end: every byte is checked
            documents = 1 if pieces else 0
            tokens = encode("".join(pieces)) + 1 if encode and pieces else 0
    except CorpusError as exc:
        raise FileRejected(filename, exc.line, exc.reason) from None
    if not documents:
        raise FileRejected(filename, None, "the file holds no text")
    return documents, tokens if count_tokens else None


def _token_counter():
    from gpt2core.tokenizer import GPT2Tokenizer  # tiktoken, no torch

    tokenizer = GPT2Tokenizer()
    return lambda text: len(tokenizer.encode(text))


def check_training_file(stream: BinaryIO, filename: str) -> int:
    """The number of documents of a training file read whole (read_training_file), or FileRejected."""
    return read_training_file(stream, filename)[0]


#: Training files up to this size get their exact token count at upload (milliseconds of tokenizing). A larger
#: file holds at least 8,192 tokens (GPT-2's longest token is 128 bytes): more than any GPT-2 context needs.
TOKEN_COUNT_MAX_BYTES = 1 << 20
#: Without a validation_file, this fraction of a training file's tokens (its tail) is held out for validation.
HELD_OUT_FRACTION = 0.05


def count_training_tokens(stream: BinaryIO, filename: str) -> int:
    """The tokens training makes of an accepted training file (read_training_file)."""
    tokens = read_training_file(stream, filename, count_tokens=True)[1]
    assert tokens is not None
    return tokens


def training_tokens(tokens: int, held_out: bool) -> int:
    """The tokens training gets from a file of `tokens` tokens: all, or all but the validation tail when
    `held_out` (gpt2core.data's split: the last ceil(n * fraction) tokens)."""
    return tokens - math.ceil(tokens * HELD_OUT_FRACTION) if held_out else tokens
