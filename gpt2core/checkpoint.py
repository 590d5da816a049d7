"""Check a Hugging Face format GPT-2 checkpoint folder without torch: read config.json and the weight files'
headers (never the weights themselves), and say whether GPT2.from_pretrained can load it, or exactly why not.

This module uses the standard library only (no torch, no numpy), so the web API can run it on an uploaded model
before anything heavy starts; :func:`gpt2core.hf.load_pretrained` runs it too, before it reads a single weight.

A checkpoint folder holds ``config.json`` and one weights layout, looked for in the order transformers'
``GPT2LMHeadModel.from_pretrained`` uses (so safetensors wins when both kinds are present):

1. ``model.safetensors``
2. ``model.safetensors.index.json`` and the shards its ``weight_map`` names
3. ``pytorch_model.bin`` (the zip archive ``torch.save`` has written since torch 1.6)
4. ``pytorch_model.bin.index.json`` and its shards

Tensor names may carry the ``transformer.`` prefix (GPT2LMHeadModel) or not (GPT2Model); it is dropped.
With C = n_embd, I = n_inner or 4 * C, V = vocab_size, P = n_positions, the checkpoint must hold exactly
(Conv1D layout: a projection's weight is [in, out])::

    wte.weight [V, C]                 wpe.weight [P, C]
    h.{i}.ln_1.weight, .bias [C]      h.{i}.attn.c_attn.weight [C, 3C], .bias [3C]
    h.{i}.ln_2.weight, .bias [C]      h.{i}.attn.c_proj.weight [C, C], .bias [C]
    ln_f.weight, .bias [C]            h.{i}.mlp.c_fc.weight [C, I], .bias [I]
                                      h.{i}.mlp.c_proj.weight [I, C], .bias [C]      (0 <= i < n_layer)

in F32, F16, BF16 or F64, and may also hold tensors that are not used: the causal-mask buffers
``*.attn.bias`` / ``*.attn.masked_bias``, ``lm_head.weight`` (tied to wte; [V, C] when present) and the heads of the
other GPT-2 classes (``score.*``, ``multiple_choice_head.*``, ``qa_outputs.*``, ``classifier.*``). Anything else is
refused. Every error message names files relative to the checkpoint folder, never the folder's own path.
"""
from __future__ import annotations

import collections
import io
import json
import math
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import GPT2_VOCAB_SIZE

__all__ = ["CheckpointError", "CheckpointInfo", "check_checkpoint", "normalise_key"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# In the order transformers looks for them.
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)

MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 16 << 20
# The safetensors library refuses headers over 100,000,000 bytes; so do we (a real header is a few kilobytes).
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_PICKLE_BYTES = 64 << 20

LOADABLE_DTYPES = ("F32", "F16", "BF16", "F64")
# Bytes per element of the safetensors dtypes (sub-byte float formats are left out: nothing here could use them).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
# torch.save names a tensor's storage by its dtype; these are the dtypes, in safetensors spelling.
TORCH_STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
}  # fmt: skip

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
IGNORED_PREFIXES = ("score.", "multiple_choice_head.", "qa_outputs.", "classifier.")
# Flags of transformers' GPT2Config that change the computation; only GPT-2's own values are supported.
FIXED_FLAGS = (
    ("scale_attn_weights", True),
    ("scale_attn_by_inverse_layer_idx", False),
    ("reorder_and_upcast_attn", False),
    ("tie_word_embeddings", True),
    ("add_cross_attention", False),
)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# transformers' GPT2Config defaults, used when config.json leaves a field out.
CONFIG_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
LAYER_TENSORS = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip
LAYER_NAME = re.compile(r"h\.(0|[1-9][0-9]{0,8})\.(.+)")  # at most 9 digits: int() of it stays cheap


class CheckpointError(ValueError):
    """A directory that is not a loadable GPT-2 checkpoint; the message says what is wrong, naming files relative
    to the checkpoint folder (never the folder's path)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`check_checkpoint` found in a loadable checkpoint.

    ``config`` is config.json as read; the named fields are its values with transformers' defaults filled in.
    ``tensors`` maps each used tensor's normalised name (no ``transformer.`` prefix), in model order, to its
    (dtype, shape, file), the file named relative to the folder: e.g. ``"h.0.attn.c_attn.weight": ("F16",
    (768, 2304), "model.safetensors")``. ``ignored`` lists, sorted, the normalised names of tensors present but
    not used. ``parameter_count`` counts GPT-2's parameters with the tied token embedding once (the gpt2 preset:
    124,439,808).
    """

    config: dict[str, Any]
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    n_inner: int | None
    layer_norm_epsilon: float
    parameter_count: int
    tensors: dict[str, tuple[str, tuple[int, ...], str]] = field(repr=False)
    ignored: list[str] = field(default_factory=list)

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def files(self) -> list[str]:
        """The weight files the used tensors come from, in the order first needed."""
        return list(dict.fromkeys(file for _, _, file in self.tensors.values()))


def normalise_key(key: str) -> str:
    """A tensor name without the ``transformer.`` prefix of GPT2LMHeadModel checkpoints."""
    return key[len("transformer.") :] if key.startswith("transformer.") else key


def check_checkpoint(directory: str | Path, *, tokenizer_vocab_size: int | None = GPT2_VOCAB_SIZE,
                     check_values: bool = True) -> CheckpointInfo:
    """Check that `directory` is a GPT-2 checkpoint GPT2.from_pretrained loads, reading config.json and only the
    headers of the weight files (safetensors header, torch.save pickle through a restricted unpickler).

    Returns a CheckpointInfo; raises CheckpointError saying the first problem found, e.g.
    ``"config.json: add_cross_attention=true is not supported"`` or
    ``"model-00002-of-00003.safetensors: tensor h.0.attn.c_attn.weight has shape [8, 16], expected [8, 24]"``.

    `tokenizer_vocab_size`: the vocabulary of the tokenizer the model will be used with (GPT-2's 50,257 by
    default); a model with fewer token embeddings could not read every token it writes. None: no such check (a
    model with a tokenizer of its own). A larger vocabulary is fine: generation never samples the extra ids.

    `check_values`: also read every weight and refuse a tensor holding NaN or an infinity (a model that cannot
    compute anything); this reads the whole checkpoint once (numpy on the raw bits, still no torch).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError("checkpoint is not a directory")
    config = _read_config(folder)
    fields_ = _config_fields(config, tokenizer_vocab_size)
    layout, tensors = _read_weights(folder)
    info = _match_tensors(config, fields_, layout, tensors)
    if check_values:
        from .weight_values import first_non_finite

        found = first_non_finite(folder, info)
        if found is not None:
            raise CheckpointError(f"{found[0]}: tensor {found[1]} holds NaN or infinite values; the model cannot "
                                  "compute anything with it")
    return info


# ----------------------------------------------------------------------------------------------------------------
# config.json


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"missing {CONFIG_FILE}")
    data = _read_json(path, CONFIG_FILE, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise CheckpointError(f"{CONFIG_FILE}: expected a JSON object")
    return data


def _read_json(path: Path, name: str, limit: int) -> Any:
    raw = _read_small_file(path, name, limit)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{name}: not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{name}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise CheckpointError(f"{name}: not valid JSON: nested too deeply") from None
    except ValueError:  # an integer of over 4300 digits
        raise CheckpointError(f"{name}: not valid JSON: a number is too large") from None


def _read_small_file(path: Path, name: str, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > limit:
        raise CheckpointError(f"{name}: larger than {limit:,} bytes")
    return raw


def _json_value(value: Any) -> str:
    """A config value for a message, cut short (values come from the user's file)."""
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _config_fields(config: dict[str, Any], tokenizer_vocab_size: int | None = GPT2_VOCAB_SIZE) -> dict[str, Any]:
    """The model-defining fields of config.json, defaults filled in; CheckpointError for unsupported values."""

    def refuse(message: str) -> CheckpointError:
        return CheckpointError(f"{CONFIG_FILE}: {message}")

    if config.get("model_type") != "gpt2":
        model_type = config.get("model_type")
        shown = repr(model_type)[:40] if isinstance(model_type, str) else _json_value(model_type)
        raise refuse(f"model_type is {shown}, expected 'gpt2'")
    out: dict[str, Any] = {}
    for name, default in CONFIG_DEFAULTS.items():
        value = config.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise refuse(f"{name} must be a positive integer, got {_json_value(value)}")
        out[name] = value
    n_inner = config.get("n_inner")
    if n_inner is not None and (not isinstance(n_inner, int) or isinstance(n_inner, bool) or n_inner < 1):
        raise refuse(f"n_inner must be a positive integer or null, got {_json_value(n_inner)}")
    out["n_inner"] = n_inner
    if out["n_embd"] % out["n_head"]:
        raise refuse(f"n_embd ({out['n_embd']}) must be divisible by n_head ({out['n_head']})")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise refuse(f"layer_norm_epsilon must be a positive number, got {_json_value(eps)}")
    out["layer_norm_epsilon"] = float(eps)
    dropout = config.get("resid_pdrop", 0.1)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise refuse(f"resid_pdrop must be a number in [0, 1), got {_json_value(dropout)}")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise refuse(f"activation_function {_json_value(activation)} is not supported (GPT-2 uses \"gelu_new\")")
    for flag, expected in FIXED_FLAGS:
        value = config.get(flag, expected)
        if value is not expected:
            raise refuse(
                f"{flag}={_json_value(value)} is not supported (GPT-2 uses {_json_value(expected)})"
            )
    if tokenizer_vocab_size is not None and out["vocab_size"] < tokenizer_vocab_size:
        raise refuse(
            f"vocab_size is {out['vocab_size']:,}, but GPT-2's tokenizer has {tokenizer_vocab_size:,} tokens; "
            f"the model needs vocab_size >= {tokenizer_vocab_size} (a larger one, with added tokens, is fine)"
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Weight files: each reader returns {name as stored: (dtype, shape)}.

TensorMeta = tuple[str, tuple[int, ...]]


def _read_weights(folder: Path) -> tuple[str, list[tuple[str, str, tuple[int, ...], str]]]:
    """The layout file found, and every tensor of the checkpoint as (stored name, dtype, shape, file)."""
    for layout in WEIGHT_FILES:
        if (folder / layout).is_file():
            break
    else:
        raise CheckpointError(f"missing weights file (expected {', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]})")
    reader = _read_safetensors if layout.startswith(SAFETENSORS_FILE) else _read_torch_zip
    shards: dict[str, set[str] | None]
    if layout in (SAFETENSORS_FILE, BIN_FILE):
        shards = {layout: None}
    else:
        shards = dict(_read_index(folder, layout))
    tensors: list[tuple[str, str, tuple[int, ...], str]] = []
    for shard, names in shards.items():
        found = reader(folder / shard, shard)
        if names is not None:
            _check_shard_against_index(layout, shard, names, found)
        tensors.extend((name, dtype, shape, shard) for name, (dtype, shape) in found.items())
    return layout, tensors


def _read_index(folder: Path, index: str) -> dict[str, set[str]]:
    """{shard file: tensor names the index puts in it}, from a sharded checkpoint's index."""
    data = _read_json(folder / index, index, MAX_INDEX_BYTES)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a JSON object with a non-empty \"weight_map\"")
    extension = ".safetensors" if index == SAFETENSORS_INDEX else ".bin"
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_file_name(shard) or not shard.endswith(extension):
            # The value itself is not repeated: it may be a path.
            raise CheckpointError(
                f"{index}: tensor {name} is not mapped to the plain name of a {extension} file in the checkpoint folder"
            )
        shards.setdefault(shard, set()).add(name)
    for shard in shards:
        if not (folder / shard).is_file():
            raise CheckpointError(f"{index}: names shard {shard}, which is missing")
    return shards


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0:") and name.strip() == name


def _check_shard_against_index(index: str, shard: str, names: set[str], found: dict[str, TensorMeta]) -> None:
    absent = sorted(names - set(found))
    if absent:
        raise CheckpointError(f"{index}: says tensor {absent[0]} is in {shard}, but {shard} does not hold it")
    extra = sorted(set(found) - names)
    if extra:
        raise CheckpointError(f"{shard}: holds tensor {extra[0]}, which {index} does not list")


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


# ----------------------------------------------------------------------------------------------------------------
# Matching the tensors against the config


def _expected_shape(name: str, f: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape GPT-2 with config fields `f` needs for normalised tensor `name`, or None if it is not one."""
    C, V, P = f["n_embd"], f["vocab_size"], f["n_positions"]
    I = f["n_inner"] or 4 * C  # noqa: E741
    if name == "wte.weight":
        return (V, C)
    if name == "wpe.weight":
        return (P, C)
    if name in ("ln_f.weight", "ln_f.bias"):
        return (C,)
    match = LAYER_NAME.fullmatch(name)
    if not match or int(match[1]) >= f["n_layer"]:
        return None
    return {
        "ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "mlp.c_fc.weight": (C, I), "mlp.c_fc.bias": (I,),
        "mlp.c_proj.weight": (I, C), "mlp.c_proj.bias": (C,),
    }.get(match[2])  # fmt: skip


def _expected_names(n_layer: int) -> Iterator[str]:
    yield "wte.weight"
    yield "wpe.weight"
    for i in range(n_layer):
        for suffix in LAYER_TENSORS:
            yield f"h.{i}.{suffix}"
    yield "ln_f.weight"
    yield "ln_f.bias"


def _is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES) or name == "lm_head.weight" or name.startswith(IGNORED_PREFIXES)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _parameter_count(f: dict[str, Any]) -> int:
    C, L = f["n_embd"], f["n_layer"]
    I = f["n_inner"] or 4 * C  # noqa: E741
    per_layer = 4 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * I + I) + (I * C + C)
    return f["vocab_size"] * C + f["n_positions"] * C + L * per_layer + 2 * C


def _match_tensors(
    config: dict[str, Any], f: dict[str, Any], layout: str, stored: list[tuple[str, str, tuple[int, ...], str]]
) -> CheckpointInfo:
    present: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for key, dtype, shape, file in stored:
        name = normalise_key(key)
        if name in present:
            other = present[name][2]
            raise CheckpointError(
                f"{file}: tensor {name} appears twice (also in {other}, with or without the 'transformer.' prefix)"
            )
        present[name] = (dtype, shape, file)
    used = {name for name in present if _expected_shape(name, f) is not None}
    expected_count = 4 + len(LAYER_TENSORS) * f["n_layer"]
    if len(used) < expected_count:
        # The first missing name lies within the first len(used) + 1 expected names, so this loop stays short
        # whatever n_layer says.
        first = next(name for name in _expected_names(f["n_layer"]) if name not in used)
        missing = expected_count - len(used)
        more = f" (and {missing - 1} more)" if missing > 1 else ""
        hint = ""
        layer = LAYER_NAME.fullmatch(first)
        if layer and int(layer[1]) > 0 and not any(name.startswith(f"h.{layer[1]}.") for name in present):
            hint = f"; config.json has n_layer={f['n_layer']} but the checkpoint holds {layer[1]} layers?"
        raise CheckpointError(f"{layout}: checkpoint lacks tensor {first}{more}{hint}")
    ignored = []
    for name, (_dtype, shape, file) in sorted(present.items()):
        if name in used:
            continue
        if not _is_ignored(name):
            hint = ""
            layer = LAYER_NAME.fullmatch(name)
            if layer and int(layer[1]) >= f["n_layer"]:
                hint = f" (config.json has n_layer={f['n_layer']})"
            raise CheckpointError(f"{file}: unexpected tensor {name}{hint}; it is not part of GPT-2")
        if name == "lm_head.weight" and shape != (f["vocab_size"], f["n_embd"]):
            raise CheckpointError(
                f"{file}: tensor lm_head.weight has shape {_shape_text(shape)}, expected "
                f"{_shape_text((f['vocab_size'], f['n_embd']))} (it is tied to wte.weight)"
            )
        ignored.append(name)
    tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for name in _expected_names(f["n_layer"]):
        dtype, shape, file = present[name]
        expected = _expected_shape(name, f)
        assert expected is not None  # every expected name has a shape
        if dtype not in LOADABLE_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {name} has dtype {dtype}; weights must be {', '.join(LOADABLE_DTYPES[:-1])} "
                f"or {LOADABLE_DTYPES[-1]}"
            )
        if shape != expected:
            message = f"{file}: tensor {name} has shape {_shape_text(shape)}, expected {_shape_text(expected)}"
            if name in ("wte.weight", "wpe.weight") and len(shape) == 2 and shape[1] == f["n_embd"]:
                field_ = "vocab_size" if name == "wte.weight" else "n_positions"
                message += f": it has {shape[0]:,} rows but config.json {field_} is {expected[0]:,}"
            raise CheckpointError(message)
        tensors[name] = (dtype, shape, file)
    return CheckpointInfo(
        config=config,
        n_layer=f["n_layer"],
        n_head=f["n_head"],
        n_embd=f["n_embd"],
        n_positions=f["n_positions"],
        vocab_size=f["vocab_size"],
        n_inner=f["n_inner"],
        layer_norm_epsilon=f["layer_norm_epsilon"],
        parameter_count=_parameter_count(f),
        tensors=tensors,
        ignored=ignored,
    )
