"""A .safetensors file's header, checked as the safetensors library checks it (without reading the weights)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from .common import DTYPE_SIZES, MAX_SAFETENSORS_HEADER, CheckpointError, TensorMeta, _json_value


def _read_safetensors(path: Path, name: str) -> dict[str, TensorMeta]:
    """Tensor names, dtypes and shapes from a .safetensors header, checked as the safetensors library checks it:
    an 8-byte little-endian header length, a JSON object header, and data offsets that exactly tile the rest."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(0)
            if size < 8:
                raise CheckpointError(f"{name}: cannot read weights: file too short ({size} bytes) for safetensors")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_SAFETENSORS_HEADER:
                raise CheckpointError(
                    f"{name}: cannot read weights: safetensors header of {header_len:,} bytes is over the "
                    f"{MAX_SAFETENSORS_HEADER:,} byte limit"
                )
            if header_len > size - 8:
                raise CheckpointError(
                    f"{name}: cannot read weights: safetensors header length {header_len:,} runs past the end "
                    f"of the {size:,} byte file (truncated?)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read weights: {exc.strerror or type(exc).__name__}") from None
    data_len = size - 8 - header_len

    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{name}: cannot read weights: {message}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"safetensors header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):
        raise bad("safetensors header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise bad(f"safetensors header is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:  # a duplicate key or NaN/Infinity
        raise bad(f"safetensors header is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad("safetensors header is not valid JSON: nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("safetensors __metadata__ must map strings to strings")
    tensors: dict[str, TensorMeta] = {}
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"tensor {key}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"tensor {key}: unsupported dtype {_json_value(dtype)}")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise bad(f"tensor {key}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
            raise bad(f"tensor {key}: data_offsets must be two non-negative integers")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if begin > end or end > data_len:
            raise bad(
                f"tensor {key}: data_offsets [{begin}, {end}] lie outside the {data_len:,} data bytes (truncated?)"
            )
        if end - begin != nbytes:
            raise bad(f"tensor {key}: data_offsets span {end - begin:,} bytes, but {dtype} {shape} needs {nbytes:,}")
        tensors[key] = (dtype, tuple(shape))
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise bad(f"tensor {key}: data starts at byte {begin:,}, expected {position:,} (a gap or an overlap)")
        position = end
    if position != data_len:
        raise bad(f"tensors cover {position:,} of the {data_len:,} data bytes")
    return tensors


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
