"""Artifacts on disk: uploaded files, models, checkpoints. Writes are streamed and atomic (temporary file, then rename).

Layout under the root:
    files/<file-id>                 uploads
    models/<model-id>/              saved models (a directory in Hugging Face format)
    jobs/<job-id>/checkpoints/      a job's checkpoints (step-NNNNNN/, see gpt2core.train)
    datasets/<sha256>-<...>/        token caches of training files, by content (and <key>.lock beside each)
    tmp/                            model imports being extracted

Writes in progress, which an interrupted process leaves behind (workers.cleanup removes them after a grace
period): files/.<file-id>.*.tmp, models/.<model-id>.partial/, tmp/<model-id>[.upload],
jobs/<job-id>/checkpoints/.tmp-step-*/ and .old-step-*/, datasets/<key>/.prepare-*/.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from jobs.errors import TooLarge

CHUNK_BYTES = 1 << 20
#: errno values that mean "no space left to write": the disk (or the writer's quota) is full.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SAFE_ID = re.compile(r"^[a-z]+-[A-Za-z0-9]+$")


@dataclass(frozen=True)
class StoredBlob:
    path: Path
    bytes: int
    sha256: str
    lines: int  # newline-separated lines, counting a last line without a newline


def disk_full_error(exc: BaseException) -> OSError | None:
    """The OSError saying the disk (or a quota) is full that caused `exc`, or is `exc`; else None. Libraries
    wrap write errors (torch.save raises a RuntimeError whose context is the OSError), so the whole chain of
    causes and contexts is searched."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        stack += [current.__cause__, current.__context__]
    return None


def _checked(id: str) -> str:
    """Ids become path components; refuse anything that could leave the folder."""
    if not _SAFE_ID.fullmatch(id):
        raise ValueError(f"not a storage-safe id: {id!r}")
    return id


class ArtifactStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / _checked(file_id)

    def model_dir(self, model_id: str) -> Path:
        return self.root / "models" / _checked(model_id)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / _checked(job_id)

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    def write_stream(self, dest: Path, stream: IO[bytes], max_bytes: int) -> StoredBlob:
        """Copy `stream` to `dest` in chunks, hashing and counting as it goes; memory use is one chunk.

        Raises TooLarge (and leaves nothing behind) once more than `max_bytes` arrive.
        """
        with self.writer(dest) as out:
            while chunk := stream.read(CHUNK_BYTES):
                if out.bytes + len(chunk) > max_bytes:
                    raise TooLarge(f"Upload exceeds the limit of {max_bytes} bytes", param="file")
                out.write(chunk)
            return out.commit()

    def writer(self, dest: Path) -> "AtomicWriter":
        """A file written piece by piece (a batch's output file): `with store.writer(path) as out: out.write(...);
        blob = out.commit()`. Nothing is at `dest` until commit; leaving the block without it removes the pieces."""
        return AtomicWriter(dest)

    def delete(self, path: Path) -> None:
        """Remove a file or a whole directory under the root; a missing path is not an error."""
        path = Path(path)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"{path} is outside the artifact root {self.root}")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class AtomicWriter:
    """Writes `dest` through a temporary file beside it (".<name>.*.tmp", which workers.cleanup removes if a process
    dies meanwhile), hashing and counting bytes and lines as it goes; `commit` syncs it and renames it into place."""

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".tmp")
        self.tmp = Path(tmp_name)
        self.out = os.fdopen(fd, "wb")
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.newlines = 0
        self.last_byte = b""
        self.blob: StoredBlob | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.out.write(data)
        self.digest.update(data)
        self.bytes += len(data)
        self.newlines += data.count(b"\n")
        self.last_byte = data[-1:]

    def commit(self) -> StoredBlob:
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        os.replace(self.tmp, self.dest)
        lines = self.newlines + (1 if self.last_byte not in (b"", b"\n") else 0)
        self.blob = StoredBlob(path=self.dest, bytes=self.bytes, sha256=self.digest.hexdigest(), lines=lines)
        return self.blob

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.blob is None:
            self.out.close()
            self.tmp.unlink(missing_ok=True)
