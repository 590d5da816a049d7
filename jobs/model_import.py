"""Importing a model: a Hugging Face format archive (tar, tar.gz or zip of config.json and weights) is extracted
safely (regular files only, no links, no path leaving the folder, bounded size and member count) and checked with
gpt2core.checkpoint, the same torch-free check GPT2.from_pretrained runs: an imported model is a model that loads.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from sqlalchemy.orm import Session, sessionmaker

# gpt2core.checkpoint imports no torch (a test keeps it so; numpy only while it scans values): the API runs without torch.
from gpt2core.checkpoint import CheckpointError, check_checkpoint
from jobs import repository
from jobs.db import session_scope
from jobs.errors import InvalidInput, InvalidRequest, TooLarge
from jobs.models import NAME_LENGTH, Model, new_id
from jobs.storage import ArtifactStore, disk_full_error
from jobs.text import check_name

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_MEMBERS = 1000
COPY_BYTES = 1 << 20
EXTRACT_RATIO = 4  # total extracted bytes may be at most this many times the upload limit
_DRIVE = re.compile(r"^[A-Za-z]:")


class InvalidModel(InvalidInput):
    """An archive that is not a loadable GPT-2 checkpoint; the message says what is wrong (never a server path)."""

    code = "invalid_model"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="file")


def import_model(sessions: sessionmaker[Session], store: ArtifactStore, owner: str, name: str | None,
                 filename: str | None, stream: IO[bytes], max_bytes: int, max_extracted_bytes: int | None = None
                 ) -> Model:
    """Store, extract, check and register an uploaded archive; on any failure nothing is left behind.

    `name` defaults to the archive's file name without its suffix. Raises InvalidInput (param "name"),
    InvalidModel, TooLarge."""
    name = (name or "").strip() or default_name(filename)
    problem = check_name(name, "name", NAME_LENGTH)
    if problem:
        raise InvalidRequest(problem, param="name", status=400)
    limit = max_extracted_bytes if max_extracted_bytes is not None else EXTRACT_RATIO * max_bytes
    model_id = new_id("model")
    scratch = store.root / "tmp"
    archive = scratch / f"{model_id}.upload"
    staging = scratch / model_id
    final = store.model_dir(model_id)
    try:
        store.write_stream(archive, stream, max_bytes)
        extract_archive(archive, staging, limit)
        archive.unlink(missing_ok=True)
        try:
            info = check_checkpoint(staging)
        except CheckpointError as exc:
            raise InvalidModel(str(exc)) from None
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
        with session_scope(sessions) as session:
            return repository.create_model(session, owner, name, "import", str(final), info.config,
                                           info.parameter_count, model_id=model_id)
    except BaseException:
        for path in (archive, staging, final):
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise


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
        raise InvalidModel(f"archive member {name!r} has a NUL byte in its name")
    text = name.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        raise InvalidModel(f"archive member {name!r} has an absolute path")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidModel(f"archive member {name!r} has a '..' path component")
    return parts


class Member:
    """One regular file of an archive: its safe path parts, declared size and how to open it."""

    def __init__(self, parts: tuple[str, ...], size: int, opener) -> None:
        self.parts, self.size, self.open = parts, size, opener


def tar_members(tar: tarfile.TarFile) -> list[Member]:
    members: list[Member] = []
    for info in tar:
        if len(members) >= MAX_MEMBERS:
            raise InvalidModel(f"the archive has more than {MAX_MEMBERS} entries")
        parts = safe_parts(info.name)
        if info.issym() or info.islnk():
            raise InvalidModel(f"archive member {info.name!r} is a link; links are not accepted")
        if info.isdir():
            continue
        if not info.isreg():
            raise InvalidModel(f"archive member {info.name!r} is not a regular file")
        if parts:
            members.append(Member(parts, info.size, lambda info=info: tar.extractfile(info)))
    return members


def zip_members(archive: zipfile.ZipFile) -> list[Member]:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise InvalidModel(f"the archive has more than {MAX_MEMBERS} entries")
    members = []
    for info in infos:
        parts = safe_parts(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InvalidModel(f"archive member {info.filename!r} is a link; links are not accepted")
        if info.is_dir():
            continue
        if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            raise InvalidModel(f"archive member {info.filename!r} is not a regular file")
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
    raise InvalidModel("the archive has no config.json at its top level or inside one top-level folder")


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
            if disk_full_error(exc) is not None:  # the server's disk, not the archive
                raise
            raise InvalidModel(f"the tar archive is damaged: {exc}") from None
        return
    if not zipfile.is_zipfile(archive):
        raise InvalidModel("the file is not a .tar, .tar.gz/.tgz or .zip archive")
    try:
        with zipfile.ZipFile(archive) as zipped:
            extract_members(zip_members(zipped), target, max_bytes)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error, OSError) as exc:
        if disk_full_error(exc) is not None:  # the server's disk, not the archive
            raise
        raise InvalidModel(f"the zip archive is damaged: {exc}") from None


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
            raise InvalidModel(f"the archive holds {'/'.join(member.parts)!r} more than once")
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
            raise InvalidModel(f"archive member {'/'.join(member.parts)!r} clashes with another member") from None
