"""Storing an uploaded file: stream it to the artifact store, read it whole with its format's reader (the one
the workers use), and record it; a refused file leaves nothing behind.

The readers by purpose: "train" and "fine-tune" files jobs.readers.read_training_file (with the token count),
"generate" files jobs.readers.check_generation_file, "batch" files jobs.openai_batch.check_batch_file. "batch_output"
files are the platform's own (jobs.batches writes them) and cannot be uploaded."""
from __future__ import annotations

from typing import IO

from sqlalchemy.orm import Session, sessionmaker

from jobs import repository
from jobs.db import session_scope
from jobs.errors import InvalidRequest
from jobs.models import NAME_LENGTH, UPLOAD_PURPOSES, File, new_id
from jobs.openai_batch import check_batch_file
from jobs.readers import TOKEN_COUNT_MAX_BYTES, check_generation_file, read_training_file, training_file_is_jsonl
from jobs.storage import ArtifactStore
from jobs.text import check_name


def check_filename(filename: str) -> None:
    problem = check_name(filename, "the file name", NAME_LENGTH)
    if problem:
        raise InvalidRequest(problem, param="file", status=400)


def upload_file(sessions: sessionmaker[Session], store: ArtifactStore, owner: str, purpose: str, filename: str,
                stream: IO[bytes], max_bytes: int) -> File:
    """The stored file. InvalidRequest (param "purpose" or "file"), FileRejected naming the first bad line,
    TooLarge past `max_bytes`."""
    if purpose == "batch_output":
        raise InvalidRequest("purpose batch_output is for the output and error files the platform writes for a batch; "
                             f"upload with one of {', '.join(UPLOAD_PURPOSES)}", param="purpose", status=400)
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose", status=400)
    check_filename(filename)
    file_id = new_id("file")
    blob = store.write_stream(store.file_path(file_id), stream, max_bytes)
    try:
        tokens = None
        with blob.path.open("rb") as stored:
            if purpose in ("train", "fine-tune"):  # one read: checked, and token-counted when small
                records, tokens = read_training_file(stored, filename, blob.bytes <= TOKEN_COUNT_MAX_BYTES,
                                                     jsonl=training_file_is_jsonl(purpose, filename))
            elif purpose == "batch":  # readable as batch input; its requests are judged when a batch is created
                records = check_batch_file(stored, filename)
            else:
                records = check_generation_file(stored, filename)
        with session_scope(sessions) as session:
            file = repository.create_file(session, owner, purpose, filename, blob, records, file_id=file_id,
                                          tokens=tokens)
    except BaseException:
        store.delete(blob.path)
        raise
    return file
