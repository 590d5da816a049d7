"""/v1/models: list, get, delete, import (a Hugging Face format archive) and download (a .tar.gz).

No torch here: an imported checkpoint is checked by reading config.json and the safetensors header only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from flask import Response, current_app, request

from jobs import repository
from jobs.errors import TooLarge
from jobs.models import Model, new_id

from .context import owner, page, paging, platform, unit_of_work, unix, v1_blueprint
from .errors import ApiError

models = v1_blueprint("models")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WTE_KEYS = ("transformer.wte.weight", "wte.weight")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# Hugging Face GPT2Config defaults, used for keys a config.json leaves out (as transformers and gpt2core do).
HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
FIXED_FLAGS = (
    ("scale_attn_weights", True),
    ("scale_attn_by_inverse_layer_idx", False),
    ("reorder_and_upcast_attn", False),
    ("tie_word_embeddings", True),
)
MAX_MEMBERS = 1000
MAX_CONFIG_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER = 100 << 20
EXTRACT_RATIO = 4  # total extracted bytes may be at most this many times max_upload_bytes (app.config overrides)
COPY_BYTES = 1 << 20
TAR_BLOCK = tarfile.BLOCKSIZE
_DRIVE = re.compile(r"^[A-Za-z]:")


def invalid_model(message: str) -> ApiError:
    return ApiError(400, "invalid_model", message, "file")


def parameter_count(config: dict[str, Any]) -> int:
    """GPT-2 parameters, the tied token embedding counted once (gpt2 small: 124,439,808)."""
    V, P, C, L = config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"]
    I = config.get("n_inner") or 4 * C
    per_layer = 2 * C + 3 * C * C + 3 * C + C * C + C + 2 * C + C * I + I + I * C + C
    return V * C + P * C + L * per_layer + 2 * C


def shape(model: Model) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "name": model.name,
        "source": model.source,
        "job_id": model.job_id,
        "config": model.config,
        "parameter_count": model.parameter_count,
        "created_at": unix(model.created_at),
    }


@models.get("/models")
def list_models():
    """List your models, newest first (`after`, `limit`)."""
    with unit_of_work() as session:
        items, has_more = repository.list_models(session, owner(), **paging())
        return page(items, has_more, shape)


@models.get("/models/<model_id>")
def get_model(model_id: str):
    """One model: name, source, producing job, config and parameter count."""
    with unit_of_work() as session:
        return shape(repository.get_model(session, owner(), model_id))


@models.delete("/models/<model_id>")
def delete_model(model_id: str):
    """Delete a model and its weights (409 while an unfinished job builds on it)."""
    with unit_of_work() as session:
        model = repository.delete_model(session, owner(), model_id)
        storage_path = model.storage_path
    remove_quietly(Path(storage_path))
    return {"id": model_id, "object": "model", "deleted": True}


def remove_quietly(path: Path) -> None:
    """Remove an artifact path after the row is gone; a failure is logged, never turned into an error."""
    try:
        platform().artifacts.delete(path)
    except (OSError, ValueError):
        current_app.logger.exception("could not remove %s", path)


# Import


@models.post("/models")
def import_model():
    """Import a Hugging Face format archive (multipart `file`, a tar or zip of config.json and weights)."""
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "Send the model archive as multipart/form-data.", "file")
    upload = request.files.get("file")
    if upload is None:
        raise ApiError(400, "invalid_request", "A 'file' part with the model archive is required.", "file")
    name = (request.form.get("name") or "").strip() or default_name(upload.filename)
    if len(name) > 255:
        raise ApiError(400, "invalid_request", "name must be at most 255 characters", "name")

    settings, artifacts = platform().settings, platform().artifacts
    model_id = new_id("model")
    scratch = artifacts.root / "tmp"
    archive = scratch / f"{model_id}.upload"
    staging = scratch / model_id
    final = artifacts.model_dir(model_id)
    limit = current_app.config.get("MAX_EXTRACTED_BYTES", EXTRACT_RATIO * settings.max_upload_bytes)
    try:
        artifacts.write_stream(archive, upload.stream, settings.max_upload_bytes)
        extract_archive(archive, staging, limit)
        archive.unlink(missing_ok=True)
        config = check_checkpoint(staging)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
        with unit_of_work() as session:
            model = repository.create_model(
                session, owner(), name, "import", str(final), config, parameter_count(config), model_id=model_id
            )
            body = shape(model)
    except BaseException:
        for path in (archive, staging, final):
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise
    return body, 201


def default_name(filename: str | None) -> str:
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    for suffix in ARCHIVE_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base[:255] or "imported-model"


def safe_parts(name: str) -> tuple[str, ...]:
    """The path components of an archive member, or invalid_model if it could leave the target folder."""
    if "\x00" in name:
        raise invalid_model(f"archive member {name!r} has a NUL byte in its name")
    text = name.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        raise invalid_model(f"archive member {name!r} has an absolute path")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise invalid_model(f"archive member {name!r} has a '..' path component")
    return parts


class Member:
    """One regular file of an archive: its safe path parts, declared size and how to open it."""

    def __init__(self, parts: tuple[str, ...], size: int, opener) -> None:
        self.parts, self.size, self.open = parts, size, opener


def tar_members(tar: tarfile.TarFile) -> list[Member]:
    members = []
    for info in tar:
        if len(members) >= MAX_MEMBERS:
            raise invalid_model(f"the archive has more than {MAX_MEMBERS} entries")
        parts = safe_parts(info.name)
        if info.issym() or info.islnk():
            raise invalid_model(f"archive member {info.name!r} is a link; links are not accepted")
        if info.isdir():
            continue
        if not info.isreg():
            raise invalid_model(f"archive member {info.name!r} is not a regular file")
        if parts:
            members.append(Member(parts, info.size, lambda info=info: tar.extractfile(info)))
    return members


def zip_members(archive: zipfile.ZipFile) -> list[Member]:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise invalid_model(f"the archive has more than {MAX_MEMBERS} entries")
    members = []
    for info in infos:
        parts = safe_parts(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise invalid_model(f"archive member {info.filename!r} is a link; links are not accepted")
        if info.is_dir():
            continue
        if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            raise invalid_model(f"archive member {info.filename!r} is not a regular file")
        if parts:
            members.append(Member(parts, info.file_size, lambda info=info: archive.open(info)))
    return members


def strip_folder(members: list[Member]) -> list[Member]:
    """Files at the top level, or inside one top-level folder (macOS __MACOSX metadata ignored)."""
    members = [m for m in members if m.parts[0] != "__MACOSX"]
    if any(m.parts == ("config.json",) for m in members):
        return members
    tops = {m.parts[0] for m in members}
    if len(tops) == 1 and all(len(m.parts) > 1 for m in members):
        return [Member(m.parts[1:], m.size, m.open) for m in members]
    raise invalid_model("the archive has no config.json at its top level or inside one top-level folder")


def extract_archive(archive: Path, target: Path, max_bytes: int) -> None:
    """Extract regular files only, after checking every member's path and type, at most `max_bytes` in all."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        tar = None  # not a tar (or one damaged before its first member): try zip
    if tar is not None:
        try:
            with tar:
                extract_members(tar_members(tar), target, max_bytes)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise invalid_model(f"the tar archive is damaged: {exc}") from None
        return
    if not zipfile.is_zipfile(archive):
        raise invalid_model("the file is not a .tar, .tar.gz/.tgz or .zip archive")
    try:
        with zipfile.ZipFile(archive) as zipped:
            extract_members(zip_members(zipped), target, max_bytes)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error, OSError) as exc:
        raise invalid_model(f"the zip archive is damaged: {exc}") from None


def extract_members(members: list[Member], target: Path, max_bytes: int) -> None:
    members = strip_folder(members)
    declared = sum(m.size for m in members)
    if declared > max_bytes:
        raise TooLarge(f"The archive would extract to {declared} bytes, over the limit of {max_bytes}", param="file")
    seen: set[tuple[str, ...]] = set()
    written = 0
    target.mkdir(parents=True)
    for member in members:
        if member.parts in seen:
            raise invalid_model(f"the archive holds {'/'.join(member.parts)!r} more than once")
        seen.add(member.parts)
        dest = target.joinpath(*member.parts)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with member.open() as source, open(dest, "xb") as out:
                while chunk := source.read(COPY_BYTES):
                    written += len(chunk)
                    if written > max_bytes:
                        raise TooLarge(f"The archive extracts to more than {max_bytes} bytes", param="file")
                    out.write(chunk)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise invalid_model(f"archive member {'/'.join(member.parts)!r} clashes with another member") from None


def positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key, HF_DEFAULTS.get(key))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid_model(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def check_config(config: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise invalid_model("config.json must hold a JSON object")
    if config.get("model_type") != "gpt2":
        raise invalid_model(f"config.json: model_type is {config.get('model_type')!r}, expected 'gpt2'")
    dims = {key: positive_int(config, key) for key in HF_DEFAULTS}
    if config.get("n_inner") is not None:
        dims["n_inner"] = positive_int(config, "n_inner")
    if dims["n_embd"] % dims["n_head"]:
        raise invalid_model(f"config.json: n_embd {dims['n_embd']} is not divisible by n_head {dims['n_head']}")
    activation = config.get("activation_function", "gelu_new")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise invalid_model(f"config.json: activation_function {activation!r} is not supported (GPT-2 uses gelu_new)")
    for flag, expected in FIXED_FLAGS:
        if config.get(flag, expected) != expected:
            raise invalid_model(f"config.json: {flag}={config[flag]!r} is not supported (GPT-2 uses {expected!r})")
    return dims


def read_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise invalid_model("the archive has no config.json")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise invalid_model(f"config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4300+ digit integers, deep nesting
        raise invalid_model(f"config.json is not valid JSON: {exc}") from None


def safetensors_header(file: Path) -> dict[str, Any]:
    size = file.stat().st_size
    with open(file, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise invalid_model("model.safetensors is too short to hold a header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise invalid_model(f"model.safetensors declares a {length}-byte header; the file is {size} bytes")
        raw = stream.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, 4300+ digit integers, deep nesting
        raise invalid_model("model.safetensors has a header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise invalid_model("model.safetensors has a header that is not a JSON object")
    data_bytes = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise invalid_model(f"model.safetensors: tensor {key!r} has data_offsets outside the file")
    return header


def check_checkpoint(directory: Path) -> dict[str, Any]:
    """The config.json content of a valid GPT-2 checkpoint directory, or invalid_model naming what's wrong."""
    config = read_config(directory)
    dims = check_config(config)
    present = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise invalid_model(f"the archive has no weights file ({' or '.join(WEIGHT_FILES)})")
    if "model.safetensors" in present:
        header = safetensors_header(directory / "model.safetensors")
        key = next((k for k in WTE_KEYS if k in header), None)
        if key is None:
            raise invalid_model("model.safetensors has no wte.weight (token embedding) tensor")
        expected = [dims["vocab_size"], dims["n_embd"]]
        found = header[key].get("shape")
        if found != expected:
            raise invalid_model(
                f"model.safetensors: {key} has shape {found}, expected {expected} (vocab_size, n_embd) from config.json"
            )
    elif (directory / "pytorch_model.bin").stat().st_size == 0:
        raise invalid_model("pytorch_model.bin is empty")
    return config


# Download


@models.get("/models/<model_id>/download")
def download_model(model_id: str):
    """The model in Hugging Face format, as a .tar.gz."""
    with unit_of_work() as session:
        model = repository.get_model(session, owner(), model_id)
    directory = Path(model.storage_path)
    if not directory.is_dir():
        raise ApiError(410, "model_files_missing", f"The files of model {model_id!r} are no longer stored.")
    return Response(
        tar_gz_stream(directory, model_id),
        mimetype="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{model_id}.tar.gz"'},
    )


def tar_gz_stream(directory: Path, folder: str) -> Iterator[bytes]:
    """A .tar.gz of `directory`'s regular files under a top-level `folder/`, made chunk by chunk."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())
    gzip = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip container
    total = 0

    def emit(data: bytes) -> bytes:
        nonlocal total
        total += len(data)
        return gzip.compress(data)

    for path in files:
        info = tarfile.TarInfo(f"{folder}/{path.relative_to(directory).as_posix()}")
        status = path.stat()
        info.size, info.mtime, info.mode = status.st_size, int(status.st_mtime), 0o644
        if out := emit(info.tobuf(format=tarfile.PAX_FORMAT)):
            yield out
        remaining = info.size
        with open(path, "rb") as stream:
            while remaining > 0:
                chunk = stream.read(min(COPY_BYTES, remaining))
                if not chunk:
                    raise OSError(f"{path} shrank while it was being sent")
                remaining -= len(chunk)
                if out := emit(chunk):
                    yield out
        if info.size % TAR_BLOCK:
            if out := emit(b"\0" * (TAR_BLOCK - info.size % TAR_BLOCK)):
                yield out
    end = b"\0" * (2 * TAR_BLOCK)
    end += b"\0" * (-(total + len(end)) % tarfile.RECORDSIZE)
    yield emit(end) + gzip.flush()
