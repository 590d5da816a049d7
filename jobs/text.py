"""What text the database can keep, and how any text is kept losslessly on PostgreSQL exactly as on SQLite.

PostgreSQL's `text` and `jsonb` refuse the NUL character (U+0000) and `jsonb` refuses NaN and infinities, while
a model can write any byte, NUL included, and a diverging run writes a NaN loss. Columns that hold what users
send or models write (prompts, completions, events, job results) therefore use the types below, which encode on
the way in and decode on the way out, on every database alike:

* in strings (and JSON object keys), U+E000 (a private-use character) becomes U+E000 U+E000 and NUL becomes
  U+E000 "0";
* a float NaN, +inf or -inf becomes the string U+E000 "nan", "inf" or "-inf".

Decoding reverses exactly that, so every string without unpaired surrogates and every float comes back unchanged.
Unpaired surrogates have no UTF-8 encoding at all: they are refused at the door (:func:`storable`).

Short identifying columns (names, file names, custom_id, idempotency keys) stay plain VARCHARs: :func:`check_name`
is their one rule.
"""
from __future__ import annotations

import math
import re
from typing import Any

from sqlalchemy import JSON, Text, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB

ESCAPE = "\ue000"
_FLOATS = {ESCAPE + "nan": math.nan, ESCAPE + "inf": math.inf, ESCAPE + "-inf": -math.inf}
_ESCAPED = re.compile(ESCAPE + "(.)", re.DOTALL)


def storable(text: str) -> bool:
    """Whether `text` is text at all: it has no unpaired surrogates (which no database can hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: The characters a name may hold, as a regular expression that Python and JSON Schema (ECMA-262) read alike: no C0
#: or C1 control characters, no DEL, no line or paragraph separator. The OpenAPI document states it for names.
NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$"
_NAME = re.compile(NAME_PATTERN)


def check_name(text: str, what: str, max_length: int) -> str | None:
    """Why `text` cannot be a name/identifier column value (1..max_length characters of NAME_PATTERN, valid
    text), or None when it can."""
    if not text:
        return f"{what} must not be empty"
    if len(text) > max_length:
        return f"{what} must be at most {max_length} characters, got {len(text)}"
    if not storable(text):
        return f"{what} must not contain unpaired surrogates"
    if not _NAME.fullmatch(text):
        return f"{what} must not contain control characters or line breaks"
    return None


def encode_text(text: str) -> str:
    if ESCAPE not in text and "\x00" not in text:
        return text
    return text.replace(ESCAPE, ESCAPE + ESCAPE).replace("\x00", ESCAPE + "0")


def decode_text(text: str) -> str:
    if ESCAPE not in text:
        return text
    return _ESCAPED.sub(lambda m: "\x00" if m.group(1) == "0" else m.group(1), text)


def encode_json(value: Any) -> Any:
    """`value` (JSON-shaped: dict, list, str, numbers, bools, None) with strings and floats made storable."""
    if isinstance(value, str):
        return encode_text(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ESCAPE + "nan"
        if math.isinf(value):
            return ESCAPE + ("inf" if value > 0 else "-inf")
        return value
    if isinstance(value, dict):
        return {encode_text(str(k)) if isinstance(k, str) else k: encode_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_json(v) for v in value]
    return value


def decode_json(value: Any) -> Any:
    if isinstance(value, str):
        if value in _FLOATS:
            return _FLOATS[value]
        return decode_text(value)
    if isinstance(value, dict):
        return {decode_text(k): decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value


class StoredText(TypeDecorator[str]):
    """TEXT that keeps any string, NUL included, on PostgreSQL as on SQLite."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> str | None:
        return None if value is None else encode_text(value)

    def process_result_value(self, value: str | None, dialect) -> str | None:
        return None if value is None else decode_text(value)


class StoredJSON(TypeDecorator[Any]):
    """JSON (JSONB on PostgreSQL) that keeps any JSON-shaped value, NUL in strings and non-finite floats
    included."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect):
        return dialect.type_descriptor(JSONB() if dialect.name == "postgresql" else JSON())

    def process_bind_param(self, value: Any, dialect) -> Any:
        return None if value is None else encode_json(value)

    def process_result_value(self, value: Any, dialect) -> Any:
        return None if value is None else decode_json(value)
