"""Checking uploaded files line by line, so a bad file is refused at upload with the first bad line named."""
from __future__ import annotations

import codecs
import json
from typing import BinaryIO

from pydantic import ValidationError

from jobs.models import is_jsonl

from .errors import ApiError
from .schemas import Sampling

READ_BYTES = 1 << 20


def invalid_file(message: str) -> ApiError:
    return ApiError(400, "invalid_file", message, "file")


def lines(stream: BinaryIO, filename: str):
    """(line number, text) for each line of a UTF-8 file, read in bounded chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, number = "", 0
    while True:
        chunk = stream.read(READ_BYTES)
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            line = number + pending.count("\n") + exc.object[: exc.start].count(b"\n") + 1
            raise invalid_file(f"{filename}: line {line} is not valid UTF-8") from None
        pending += text
        *complete, pending = pending.split("\n")
        for line in complete:
            number += 1
            yield number, line
        if not chunk:
            break
    if pending:
        yield number + 1, pending


def check_training_file(stream: BinaryIO, filename: str) -> int:
    """Plain UTF-8 text, or JSONL with a string `text` per line. Returns the number of documents."""
    jsonl = is_jsonl(filename)
    documents, has_text = 0, False
    for number, line in lines(stream, filename):
        if not jsonl:
            has_text = has_text or bool(line.strip())
            continue
        if not line.strip():
            continue
        record = parse_json_line(line, number, filename)
        if not isinstance(record.get("text"), str):
            raise invalid_file(f"{filename}: line {number} needs a string field 'text'")
        has_text = has_text or bool(record["text"])
        documents += 1
    if not has_text:
        raise invalid_file(f"{filename}: the file holds no text")
    return documents if jsonl else 1


def check_generation_file(stream: BinaryIO, filename: str) -> int:
    """JSONL lines {"custom_id": str, "prompt": str, "sampling": {...} optional}, custom_ids unique.

    Returns the number of prompts."""
    seen: dict[str, int] = {}
    for number, line in lines(stream, filename):
        if not line.strip():
            continue
        record = parse_json_line(line, number, filename)
        unknown = set(record) - {"custom_id", "prompt", "sampling"}
        if unknown:
            raise invalid_file(f"{filename}: line {number} has unknown field '{sorted(unknown)[0]}'")
        custom_id, prompt = record.get("custom_id"), record.get("prompt")
        if not isinstance(custom_id, str) or not custom_id:
            raise invalid_file(f"{filename}: line {number} needs a non-empty string 'custom_id'")
        if not isinstance(prompt, str):
            raise invalid_file(f"{filename}: line {number} needs a string 'prompt'")
        if custom_id in seen:
            raise invalid_file(
                f"{filename}: line {number} repeats custom_id {custom_id!r} from line {seen[custom_id]}"
            )
        seen[custom_id] = number
        if "sampling" in record:
            try:
                Sampling.model_validate(record["sampling"])
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                field = ".".join(["sampling", *(str(p) for p in first["loc"])])
                raise invalid_file(f"{filename}: line {number}: {field}: {first['msg']}") from None
    if not seen:
        raise invalid_file(f"{filename}: the file holds no prompts")
    return len(seen)


def parse_json_line(line: str, number: int, filename: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise invalid_file(f"{filename}: line {number} is not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError):  # an integer of over 4300 digits; nesting too deep to parse
        raise invalid_file(f"{filename}: line {number} is not valid JSON (too large or too deeply nested)") from None
    if not isinstance(record, dict):
        raise invalid_file(f"{filename}: line {number} is not a JSON object")
    return record
