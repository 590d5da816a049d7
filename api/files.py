"""/v1/files: upload, list, fetch, download and delete files (training text/JSONL, generation input JSONL)."""
from __future__ import annotations

from flask import request, send_file

from jobs import repository
from jobs.models import FILE_PURPOSES, File
from jobs import uploads

from .context import owner, page, paging, platform, refuse_repeated_form_fields, unit_of_work, unix, v1_blueprint
from .errors import ApiError
from .model_routes import remove_quietly

files = v1_blueprint("files")
# Room for the multipart framing around the file, so the size limit applies to the file itself (checked exactly
# while it is stored) rather than to the whole request body.
MULTIPART_OVERHEAD = 1 << 20


def file_object(file: File) -> dict:
    return {
        "id": file.id,
        "object": "file",
        "purpose": file.purpose,
        "filename": file.filename,
        "bytes": file.bytes,
        "sha256": file.sha256,
        "records": file.records,
        "tokens": file.tokens,
        "created_at": unix(file.created_at),
    }


@files.post("/files")
def upload_file():
    """Upload a file (multipart: `file`, `purpose` train or generate); checked line by line before it is stored."""
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "Upload files as multipart/form-data with fields file and purpose.")
    request.max_content_length = platform().settings.max_upload_bytes + MULTIPART_OVERHEAD
    refuse_repeated_form_fields("file", "purpose")
    purpose = request.form.get("purpose")
    if purpose not in FILE_PURPOSES:
        raise ApiError(400, "invalid_request", f"purpose must be one of {', '.join(FILE_PURPOSES)}", "purpose")
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise ApiError(400, "invalid_request", "the multipart field 'file' is required", "file")
    settings = platform().settings
    file = uploads.upload_file(platform().sessions, platform().artifacts, owner(), purpose, upload.filename, upload.stream,
                       settings.max_upload_bytes)
    return file_object(file), 201


@files.get("/files")
def list_files():
    """List your files, newest first (`purpose`, `after`, `limit`)."""
    purpose = request.args.get("purpose")
    if purpose is not None and purpose not in FILE_PURPOSES:
        raise ApiError(400, "invalid_request", f"purpose must be one of {', '.join(FILE_PURPOSES)}", "purpose")
    with unit_of_work() as session:
        items, has_more = repository.list_files(session, owner(), purpose=purpose, **paging())
        return page(items, has_more, file_object)


@files.get("/files/<file_id>")
def get_file(file_id: str):
    """One file's metadata."""
    with unit_of_work() as session:
        return file_object(repository.get_file(session, owner(), file_id))


@files.get("/files/<file_id>/content")
def file_content(file_id: str):
    """The file's bytes, as uploaded."""
    with unit_of_work() as session:
        file = repository.get_file(session, owner(), file_id)
    # The bytes as they were sent, whatever the name suggests: never served as a type a browser would render.
    return send_file(file.storage_path, mimetype="application/octet-stream", as_attachment=True,
                     download_name=file.filename)


@files.delete("/files/<file_id>")
def delete_file(file_id: str):
    """Delete a file (409 while an unfinished job uses it)."""
    with unit_of_work() as session:
        file = repository.delete_file(session, owner(), file_id)
    remove_quietly(platform().artifacts.file_path(file.id))  # what cannot be removed now, the garbage collector does
    return {"id": file.id, "object": "file", "deleted": True}
