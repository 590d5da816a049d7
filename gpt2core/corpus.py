"""How a corpus file's bytes become lines and documents: the one set of reading rules, without torch or numpy.

:func:`gpt2core.data.prepare_dataset` reads training files with these functions, and the platform's upload check
(``jobs.readers``) runs the very same ones, so a file accepted at upload is read line for line the same way when
it is trained on.

Rules (every format):

* The bytes must be UTF-8; the first invalid byte is an error naming its line and byte offset.
* A UTF-8 byte-order mark (U+FEFF) at the very start of the file is dropped; anywhere else it is content.
* Lines end at ``"\\n"`` only. A ``"\\r"`` right before a ``"\\n"`` belongs to that line ending (CRLF reads as LF).
  Any other ``"\\r"`` (a lone CR), form feeds, U+0085, U+2028 and U+2029 are ordinary characters inside a line,
  never line breaks (unlike Python's ``str.splitlines`` or text-mode files).

Plain text: the whole file is one document; CRLF line endings become LF, every other character is kept.

JSONL (one JSON object per line): a line holding only JSON whitespace (spaces, tabs, CRs) is skipped; every other
line must be a JSON object, with no key twice in one object. Raw control characters inside JSON strings are
invalid JSON (as RFC 8259 says); escaped ones (``\\u0000``, ``\\r``) are content. Text with an unpaired surrogate
(a lone ``\\ud800`` escape) is refused: it is not text, and it cannot be encoded as UTF-8 or stored.

Training JSONL: each line is ``{"text": "..."}`` (trained on whole) or ``{"prompt": "...", "completion": "..."}``
(only the completion and the end-of-text after it are loss targets); one file may mix both. See
:func:`training_record`.
"""
from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

BOM = "\ufeff"
JSON_WHITESPACE = " \t\r\n"
DEFAULT_READ_BYTES = 1 << 20


class CorpusError(ValueError):
    """A line of a corpus file that breaks the reading rules. `line` is 1-based; `reason` has no file name."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def _utf8_reason(exc: UnicodeDecodeError, offset: int) -> str:
    bad = exc.object[exc.start : exc.start + 1]
    return f"invalid UTF-8 (byte 0x{bad.hex() or '??'} at byte offset {offset + exc.start}: {exc.reason})"


def iter_lines(stream: BinaryIO, read_bytes: int = DEFAULT_READ_BYTES) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending) for every line of a binary UTF-8 stream, blank ones too.

    Lines split at ``b"\\n"`` only (see the module rules); a final line without ``"\\n"`` is yielded when it is
    not empty. A single line is held whole in memory. Raises :class:`CorpusError` on invalid UTF-8."""
    pieces: list[bytes] = []  # the unfinished line, in parts (a long line costs no quadratic copying)
    number = 0
    offset = 0  # byte offset of the current line in the stream
    while True:
        chunk = stream.read(read_bytes)
        if not chunk:
            if pieces and (raw := b"".join(pieces)):
                yield number + 1, _decode_line(raw, number + 1, offset)
            return
        *complete, rest = chunk.split(b"\n")
        for part in complete:
            raw = b"".join([*pieces, part]) if pieces else part
            pieces = []
            number += 1
            yield number, _decode_line(raw, number, offset)
            offset += len(raw) + 1
        if rest:
            pieces.append(rest)


def _decode_line(raw: bytes, number: int, offset: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(number, _utf8_reason(exc, offset)) from None
    if number == 1 and text.startswith(BOM):
        text = text[1:]
    return text[:-1] if text.endswith("\r") else text


def iter_text(stream: BinaryIO, read_bytes: int = DEFAULT_READ_BYTES) -> Iterator[str]:
    """A plain-text file's content in pieces of about `read_bytes` (concatenated: the whole document), with the
    leading BOM dropped and CRLF read as LF. Raises :class:`CorpusError` naming the line of invalid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    newlines = 0  # "\n" in all bytes fully decoded before the current block
    offset = 0  # bytes read before the current block
    first, held_cr = True, False
    while True:
        block = stream.read(read_bytes)
        final = not block
        pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the previous block
        try:
            text = decoder.decode(block, final=final)
        except UnicodeDecodeError as exc:
            line = 1 + newlines + exc.object[: exc.start].count(b"\n")
            raise CorpusError(line, _utf8_reason(exc, offset - pending)) from None
        newlines += block.count(b"\n")
        offset += len(block)
        if first and text:
            text = text.removeprefix(BOM)
            first = False
        if held_cr:
            text = "\r" + text
            held_cr = False
        if text.endswith("\r") and not final:
            text, held_cr = text[:-1], True  # a CR at the end of a block may start a CRLF
        text = text.replace("\r\n", "\n")
        if text:
            yield text
        if final:
            return


def is_blank(line: str) -> bool:
    """A JSONL line holding only JSON whitespace (spaces, tabs, CRs), which is skipped. Other whitespace, such as
    U+2028 or a form feed, is not JSON and makes the line invalid."""
    return not line.strip(JSON_WHITESPACE)


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: {"prompt": "a", "prompt": "b"} is refused rather than read as
    one of the two (which one is not defined by the JSON standard)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return record


def parse_json_line(line: str, number: int) -> dict[str, Any]:
    """The JSON object on one line, or :class:`CorpusError` saying why not."""
    try:
        record = json.loads(line, object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise CorpusError(number, f"key {exc.key!r} appears twice in one object") from None
    except json.JSONDecodeError as exc:
        raise CorpusError(number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError):  # an integer of over 4300 digits; nesting too deep to parse
        raise CorpusError(number, "invalid JSON: too large or too deeply nested") from None
    if not isinstance(record, dict):
        raise CorpusError(number, f"expected a JSON object, got {type(record).__name__}")
    return record


def unpaired_surrogate(text: str) -> int | None:
    """The index of the first unpaired surrogate in `text` (not text: it has no UTF-8 encoding), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_text(value: str, number: int, field: str) -> str:
    """`value` if it is text (no unpaired surrogates), else :class:`CorpusError` naming the field."""
    index = unpaired_surrogate(value)
    if index is not None:
        raise CorpusError(number, f'"{field}" has an unpaired surrogate (U+{ord(value[index]):04X}) at '
                          f"character {index}; it is not text")
    return value


@dataclass(frozen=True)
class TrainingRecord:
    """One document of a training JSONL file (its `line`, 1-based).

    ``{"text": t}`` reads as ``prompt == ""``, ``completion == t``: trained on whole. ``{"prompt": p,
    "completion": c}`` reads as given: ``p`` is context only (its tokens are inputs, never loss targets), ``c``
    and the end-of-text token after it are the targets. Training tokenizes the two separately and concatenates
    them (``encode(prompt) + encode(completion) + [eot]``), so the boundary between them is exact; a record with
    both empty is no document (as an empty "text" is not)."""

    line: int
    prompt: str
    completion: str

    @property
    def empty(self) -> bool:
        return not self.prompt and not self.completion


def training_record(record: dict[str, Any], number: int) -> TrainingRecord:
    """The rule for one training JSONL object (line `number`): either a string "text", or a string "prompt" and a
    string "completion" (a file may mix the two kinds, line by line). Other fields are data, not settings, and are
    ignored (a corpus carries "source", "id", ...); but "text" with "prompt" or "completion" is refused as
    ambiguous. Raises :class:`CorpusError` saying what is wrong."""
    has_prompt, has_completion = "prompt" in record, "completion" in record
    if "text" in record:
        if has_prompt or has_completion:
            other = "prompt" if has_prompt else "completion"
            raise CorpusError(number, f'has both "text" and "{other}": a line is either {{"text": ...}} or '
                              '{"prompt": ..., "completion": ...}')
        text = record["text"]
        if not isinstance(text, str):
            raise CorpusError(number, f'"text" must be a string, got {type(text).__name__}')
        return TrainingRecord(number, "", check_text(text, number, "text"))
    if not has_prompt and not has_completion:
        raise CorpusError(number, 'JSON object has no "text" field (nor "prompt" and "completion")')
    if not has_completion:
        raise CorpusError(number, 'has "prompt" but no "completion" (a prompt/completion line needs both)')
    if not has_prompt:
        raise CorpusError(number, 'has "completion" but no "prompt" (a prompt/completion line needs both)')
    for field in ("prompt", "completion"):
        if not isinstance(record[field], str):
            raise CorpusError(number, f'"{field}" must be a string, got {type(record[field]).__name__}')
        check_text(record[field], number, field)
    return TrainingRecord(number, record["prompt"], record["completion"])


def iter_training_records(stream: BinaryIO, read_bytes: int = DEFAULT_READ_BYTES) -> Iterator[TrainingRecord]:
    """The record of each non-blank line of a training JSONL file (:func:`training_record`'s rule), empty ones
    included (the caller skips them). Raises :class:`CorpusError` at the first line that breaks the rules."""
    for number, line in iter_lines(stream, read_bytes):
        if is_blank(line):
            continue
        yield training_record(parse_json_line(line, number), number)
