"""/v1/models: list, get, delete, import (a Hugging Face format archive) and download (a .tar.gz).

The import itself (safe extraction, the torch-free checkpoint check) is jobs.model_import; this only speaks HTTP.
"""
from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Response, current_app, request

from jobs import model_import, repository
from jobs.repository import MAX_PAGE_SIZE
from jobs.models import Model

from .context import owner, page, paging, platform, check_form_fields, unit_of_work, unix, v1_blueprint
from .errors import ApiError

models = v1_blueprint("models")

COPY_BYTES = 1 << 20
TAR_BLOCK = tarfile.BLOCKSIZE


def shape(model: Model) -> dict[str, Any]:
    """A model object: ours, with OpenAI's `created` (the same instant as created_at) and `owned_by` (the owner),
    which the `openai` SDK's client.models.list() and retrieve() read."""
    return {
        "id": model.id,
        "object": "model",
        "created": unix(model.created_at),
        "owned_by": model.owner,
        "name": model.name,
        "source": model.source,
        "job_id": model.job_id,
        "checkpoint_step": model.checkpoint_step,
        "config": model.config,
        "parameter_count": model.parameter_count,
        "created_at": unix(model.created_at),
    }


@models.get("/models")
def list_models():
    """List your models, newest first (`after`, `limit`); without `limit`, all of them (OpenAI's models list is
    not paged: the `openai` SDK's client.models.list() reads one answer)."""
    query = paging()
    with unit_of_work() as session:
        if "limit" in request.args:
            items, has_more = repository.list_models(session, owner(), **query)
            return page(items, has_more, shape)
        items, has_more, after = [], True, query["after"]
        while has_more:
            chunk, has_more = repository.list_models(session, owner(), after=after, limit=MAX_PAGE_SIZE)
            items += chunk
            after = chunk[-1].id if chunk else after
        return page(items, False, shape)


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
    check_form_fields("file", "name")
    upload = request.files.get("file")
    if upload is None:
        raise ApiError(400, "invalid_request", "A 'file' part with the model archive is required.", "file")
    settings = platform().settings
    model = model_import.import_model(
        platform().sessions, platform().artifacts, owner(), request.form.get("name"), upload.filename,
        upload.stream, settings.max_upload_bytes, current_app.config.get("MAX_EXTRACTED_BYTES"))
    return shape(model), 201


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
