"""Whether a checkpoint's weights are finite, read straight from the files without torch (numpy on raw bits).

A weight that is NaN or infinite makes every forward pass NaN: generation would silently write token 0 and
training would stop at its first step. check_checkpoint refuses such a checkpoint, naming the tensor.
"""
from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .common import normalise_key
from .torch_archive import _HeaderUnpickler

if TYPE_CHECKING:
    from .common import CheckpointInfo

#: dtype -> (unsigned integer view, exponent mask): a float is NaN or infinite exactly when all its exponent bits
#: are set (IEEE 754; bfloat16 is float32's upper half).
EXPONENT_BITS = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}
CHUNK_BYTES = 1 << 24


def first_non_finite(folder: Path, info: CheckpointInfo) -> tuple[str, str] | None:
    """(file, tensor name) of the first tensor the model uses that holds a NaN or an infinity, else None.

    Reads every used tensor's bytes once, CHUNK_BYTES at a time. The files were already checked by
    check_checkpoint's header pass, so their layout is known to be sound."""
    for file in info.files:
        used = {name for name, (_, _, where) in info.tensors.items() if where == file}
        path = folder / file
        if file.endswith(".safetensors"):
            spans = _safetensors_spans(path)
            for stored, (dtype, start, stop) in spans.items():
                name = normalise_key(stored)
                if name in used and _has_non_finite(_file_chunks(path, start, stop), dtype):
                    return file, name
        else:
            with zipfile.ZipFile(path) as archive:
                for name, dtype, member in _torch_zip_storages(archive):
                    if normalise_key(name) in used:
                        with archive.open(member) as stream:
                            if _has_non_finite(_stream_chunks(stream), dtype):
                                return file, normalise_key(name)
    return None


def _has_non_finite(chunks, dtype: str) -> bool:
    import numpy as np

    view, mask = EXPONENT_BITS[dtype]
    mask_value = np.array(mask, dtype=view)
    carry = b""
    size = np.dtype(view).itemsize
    for chunk in chunks:
        data = carry + chunk
        whole = len(data) - len(data) % size
        carry = data[whole:]
        bits = np.frombuffer(data[:whole], dtype=view)
        if np.any((bits & mask_value) == mask_value):
            return True
    return False


def _file_chunks(path: Path, start: int, stop: int):
    with path.open("rb") as f:
        f.seek(start)
        remaining = stop - start
        while remaining > 0:
            chunk = f.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


def _stream_chunks(stream: BinaryIO):
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def _safetensors_spans(path: Path) -> dict[str, tuple[str, int, int]]:
    """{stored name: (dtype, first byte, end byte)} of a safetensors file's float tensors (absolute offsets)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    return {name: (entry["dtype"], base + entry["data_offsets"][0], base + entry["data_offsets"][1])
            for name, entry in header.items()
            if name != "__metadata__" and entry.get("dtype") in EXPONENT_BITS}


def _torch_zip_storages(archive: zipfile.ZipFile):
    """(stored tensor name, dtype, zip member of its storage) for each float tensor of a torch.save archive, read
    through the same restricted unpickler as the header check. A tensor may view part of its storage: the whole
    storage is scanned."""
    prefix = archive.infolist()[0].filename.split("/", 1)[0]
    state = _HeaderUnpickler(io.BytesIO(archive.read(f"{prefix}/data.pkl"))).load()
    for name, tensor in dict.items(state):
        dtype = tensor.storage.dtype
        if dtype in EXPONENT_BITS:
            yield name, dtype, f"{prefix}/data/{tensor.storage.key}"
