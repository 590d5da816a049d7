"""/v1/files: upload, list, fetch, download and delete files (training text/JSONL, generation input JSONL, OpenAI
batch input, and the platform's batch output files). File objects carry OpenAI's fields too (`status`,
`status_details`), so the `openai` SDK's client.files reads them."""
from __future__ import annotations

from flask import request, send_file

from jobs import repository
from jobs.models import FILE_PURPOSES, UPLOAD_PURPOSES, File
from jobs import uploads

from .context import owner, page, paging, platform, check_form_fields, unit_of_work, unix, v1_blueprint
from .errors import ApiError
from .model_routes import remove_quietly

files = v1_blueprint("files")
# Room for the multipart framing around the file, so the size limit applies to the file itself (checked exactly
# while it is stored) rather than to the whole request body.
MULTIPART_OVERHEAD = 1 << 20
#: The orders a list of files comes in (OpenAI's `order`): by creation, oldest or newest first.
FILE_ORDERS = ("desc", "asc")


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
        # OpenAI's: every stored file was read whole and accepted at upload (or written whole by the platform).
        "status": "processed",
        "status_details": None,
    }


@files.post("/files")
def upload_file():
    """Upload a file (multipart: `file`, `purpose` train, fine-tune, generate or batch); checked line by line before
    it is stored."""
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "Upload files as multipart/form-data with fields file and purpose.")
    request.max_content_length = platform().settings.max_upload_bytes + MULTIPART_OVERHEAD
    check_form_fields("file", "purpose")
    purpose = request.form.get("purpose")
    if purpose == "batch_output":
        raise ApiError(400, "invalid_request", "purpose batch_output is for the output and error files the platform "
                       f"writes for a batch; upload with one of {', '.join(UPLOAD_PURPOSES)}", "purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise ApiError(400, "invalid_request", f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", "purpose")
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise ApiError(400, "invalid_request", "the multipart field 'file' is required", "file")
    settings = platform().settings
    file = uploads.upload_file(platform().sessions, platform().artifacts, owner(), purpose, upload.filename, upload.stream,
                       settings.max_upload_bytes)
    return file_object(file), 201


@files.get("/files")
def list_files():
    """List your files, newest first (`purpose`, `order` asc or desc, `after`, `limit`)."""
    purpose = request.args.get("purpose")
    if purpose is not None and purpose not in FILE_PURPOSES:
        raise ApiError(400, "invalid_request", f"purpose must be one of {', '.join(FILE_PURPOSES)}", "purpose")
    order = request.args.get("order", "desc")
    if order not in FILE_ORDERS:
        raise ApiError(400, "invalid_request", "order must be asc (oldest first) or desc (newest first)", "order")
    with unit_of_work() as session:
        items, has_more = repository.list_files(session, owner(), purpose=purpose, order=order, **paging())
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
