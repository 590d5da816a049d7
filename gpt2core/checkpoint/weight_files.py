"""Which weight files a checkpoint has (single or sharded, safetensors preferred as transformers does) and every
tensor they hold, read by safetensors_file or torch_archive."""
from __future__ import annotations

from pathlib import Path

from .common import (
    BIN_FILE,
    MAX_INDEX_BYTES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    WEIGHT_FILES,
    CheckpointError,
    TensorMeta,
)
from .config_file import _read_json
from .safetensors_file import _read_safetensors
from .torch_archive import _read_torch_zip


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
