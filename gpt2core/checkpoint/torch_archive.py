"""A torch.save zip archive read without torch: its data.pkl through a restricted unpickler that builds records
of tensors and storages and refuses every other global (so a hostile pickle runs no code)."""
from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import DTYPE_SIZES, MAX_PICKLE_BYTES, TORCH_STORAGE_DTYPES, CheckpointError, TensorMeta
from .safetensors_file import _natural


# torch.save's zip archive: <prefix>/data.pkl pickles the state dict; each storage's bytes are <prefix>/data/<key>.


def _no_state(self: Any, state: Any) -> None:
    raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}")


# Records the restricted unpickler builds. __setstate__ refuses, so a pickle cannot BUILD new field values into them
# (frozen slots dataclasses would otherwise get a __setstate__ that accepts any state).


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: str

    __setstate__ = _no_state


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str
    numel: int

    __setstate__ = _no_state


@dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    __setstate__ = _no_state


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    if not (_natural(offset) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise pickle.UnpicklingError("tensor with malformed offset, size or stride")
    if not all(_natural(d) for d in size) or not all(_natural(s) for s in stride):
        raise pickle.UnpicklingError("tensor with a negative or non-integer size or stride")
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_rest: Any) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles torch.save's data.pkl into _TensorRef records: only OrderedDict, the two tensor rebuild functions
    and the typed storage classes may be named; storages become _Storage records, their bytes are never read."""

    def __init__(self, file: Any):
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return _StorageType(TORCH_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unsupported persistent id")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _natural(numel):
            raise pickle.UnpicklingError("malformed storage reference")
        storage = _Storage(key, storage_type.dtype, numel)
        if self.storages.setdefault(key, storage) != storage:
            raise pickle.UnpicklingError(f"storage {key} is referenced with two different types or sizes")
        return storage


LEGACY_TORCH_MESSAGE = (
    "not a zip archive, so not the format torch.save has written since torch 1.6 (legacy torch.save files are not "
    "supported: re-save with torch>=1.6 or as safetensors)"
)


def _read_torch_zip(path: Path, name: str) -> dict[str, TensorMeta]:
    """Tensor names, dtypes and shapes of a torch.save zip archive, from its data.pkl through a restricted
    unpickler; each tensor's storage record must exist and hold exactly its bytes."""

    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{name}: cannot read weights: {message}")

    try:
        with path.open("rb") as f:
            magic = f.read(4)
        if magic[:2] != b"PK":
            raise bad(LEGACY_TORCH_MESSAGE)
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            if not infos:
                raise bad("empty zip archive")
            prefix = next(iter(infos)).split("/", 1)[0]
            pickle_info = infos.get(f"{prefix}/data.pkl")
            if pickle_info is None:
                raise bad("zip archive without data.pkl, so not written by torch.save")
            if pickle_info.file_size > MAX_PICKLE_BYTES:
                raise bad(f"data.pkl is over {MAX_PICKLE_BYTES:,} bytes")
            pickled = archive.read(pickle_info)
    except CheckpointError:
        raise
    except OSError as exc:
        raise bad(exc.strerror or type(exc).__name__) from None
    except Exception as exc:  # BadZipFile, zlib.error, struct.error, EOFError...: all mean a damaged archive
        raise bad(f"corrupt or truncated zip archive ({type(exc).__name__}: {exc})") from None
    unpickler = _HeaderUnpickler(io.BytesIO(pickled))
    try:
        state = unpickler.load()
    except Exception as exc:  # whatever a hostile or corrupt pickle raises, it is refused the same way
        raise bad(f"data.pkl: {exc}") from None
    if type(state) not in (dict, collections.OrderedDict):
        raise bad("expected the pickled object to be a dict of tensor name -> tensor")
    tensors: dict[str, TensorMeta] = {}
    for key, tensor in dict.items(state):  # not state.items: a pickle can BUILD attributes onto an OrderedDict
        if not isinstance(key, str):
            raise bad(f"tensor name {key!r} is not a string")
        if not isinstance(tensor, _TensorRef):
            raise bad(f"entry {key} is not a tensor")
        tensors[key] = (tensor.storage.dtype, tensor.shape)
        if math.prod(tensor.shape) == 0:
            continue
        last = tensor.offset + sum((d - 1) * s for d, s in zip(tensor.shape, tensor.stride))
        if last >= tensor.storage.numel:
            raise bad(f"tensor {key} reaches past the end of its storage")
    for storage in unpickler.storages.values():
        record = infos.get(f"{prefix}/data/{storage.key}")
        expected = storage.numel * DTYPE_SIZES[storage.dtype]
        if record is None:
            raise bad(f"storage data/{storage.key} is missing from the archive")
        if record.file_size != expected:
            raise bad(f"storage data/{storage.key} holds {record.file_size:,} bytes, expected {expected:,}")
    return tensors
