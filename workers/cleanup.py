"""Garbage collection of artifacts: disk stays bounded. `collect_garbage(rt)` removes what nothing refers to any
more, and the leftovers of writes that were interrupted; the workers' periodic sweeper calls it (about every
INTERVAL_SECONDS is plenty).

Under the artifact root (layout: jobs.storage), it removes:

- files/<file-id> with no file row (a delete whose removal failed), and upload temp files (.<file-id>.*.tmp);
- models/<model-id>/ with no model row, and staging folders of job models (.<model-id>.partial/);
- tmp/ entries (model imports being extracted);
- jobs/<job-id>/ with no job row; in a job's checkpoints/, gpt2core's temporary folders (.tmp-step-*, .old-step-*);
  for a finished job, complete step-* folders with no checkpoint row, and the checkpoints its retention does not
  keep (jobs.retention: the last keep_checkpoints plus the best by validation loss; the worker applies it while
  the job runs, this catches up on jobs that ended before it could, or before retention existed);
- datasets/<sha256>-<...>/ (and their .lock) when no file has that content any more. Jobs refer to files by id, and a
  file cannot be deleted while an unfinished job uses it, so no file with the hash means no job that will read
  the cache. The cache's lock is taken (without waiting: a cache in use is skipped) and the database asked again
  before it goes, so a job preparing it for a file uploaded meanwhile waits and prepares it anew.

Nothing is removed before it has been left untouched (no write, rename or new entry anywhere inside it) for
`grace_seconds` (GRACE_SECONDS): a job or upload writing right now, or between writing its files and committing
their row, is never disturbed. The database decides what is referenced: when it holds no job, file or model at
all while the folder has artifacts (a worker pointed at a fresh or wrong database), only leftovers of interrupted
writes are removed. One collection runs at a time per artifact folder (a lock file, .gc.lock).
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import exists, select

from gpt2core.train import list_checkpoints
from jobs import retention
from jobs.models import Checkpoint, File, Job, Model
from jobs.states import TERMINAL

from .runtime import Runtime
from .datasets import dataset_lock, same_file

log = logging.getLogger("workers.cleanup")

GRACE_SECONDS = 3600.0
INTERVAL_SECONDS = 600.0
COUNTS = ("files", "models", "jobs", "checkpoints", "datasets", "staging")
_BATCH = 500
_ID = re.compile(r"^(file|model|job)-[A-Za-z0-9]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_TEMP = re.compile(r"^\.file-[A-Za-z0-9]+\..*\.tmp$")
_MODEL_STAGING = re.compile(r"^\.model-[A-Za-z0-9]+\.partial$")
_CHECKPOINT_TEMP = re.compile(r"^\.(tmp|old)-step-\d+-[0-9a-f]+$")


def collect_garbage(rt: Runtime, *, grace_seconds: float = GRACE_SECONDS, now: float | None = None) -> dict[str, int]:
    """Remove unreferenced artifacts and leftovers older than `grace_seconds` (see the module doc); returns how
    many of each kind were removed: {"files", "models", "jobs", "checkpoints", "datasets", "staging"}. A path it
    cannot remove is logged and left for the next collection; a database error propagates (nothing half-done:
    rows go before their files, and files without rows are what the next collection looks for)."""
    counts = dict.fromkeys(COUNTS, 0)
    root = rt.artifacts.root
    if not root.is_dir():
        return counts
    with _try_lock(root / ".gc.lock") as mine:
        if not mine:
            log.info("another garbage collection is running on %s; skipping", root)
            return counts
        _Collection(rt, counts, (time.time() if now is None else now) - grace_seconds).run()
    if any(counts.values()):
        log.info("garbage collection removed %s", ", ".join(f"{n} {kind}" for kind, n in counts.items() if n))
    return counts


class _Collection:
    def __init__(self, rt: Runtime, counts: dict[str, int], cutoff: float):
        self.rt, self.counts, self.cutoff = rt, counts, cutoff
        self.root = rt.artifacts.root

    def run(self) -> None:
        with self.rt.transaction() as session:
            empty = not session.scalar(select(exists(select(Job.id)) | exists(select(File.id)) | exists(select(Model.id))))
        if empty and any(_entries(self.root / folder) for folder in ("files", "models", "jobs", "datasets")):
            log.warning("the database holds no job, file or model, but %s holds artifacts: is this worker on the "
                        "right DATABASE_URL? Only leftovers of interrupted writes are removed", self.root)
        self.files(orphans=not empty)
        self.models(orphans=not empty)
        self.scratch()
        self.jobs(orphans=not empty)
        if not empty:
            self.datasets()

    # Helpers

    def old(self, path: Path) -> bool:
        return untouched_since(path, self.cutoff)

    def remove(self, path: Path, kind: str) -> bool:
        try:
            self.rt.artifacts.delete(path)
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            log.warning("could not remove %s", path, exc_info=True)
            return False
        self.counts[kind] += 1
        return True

    def existing(self, column: Any, values: Iterable[str]) -> set[str]:
        """The `values` that `column` holds in some row."""
        values = sorted(set(values))
        found: set[str] = set()
        for start in range(0, len(values), _BATCH):
            with self.rt.transaction() as session:
                found.update(session.scalars(select(column).where(column.in_(values[start:start + _BATCH])).distinct()))
        return found

    # What is collected

    def files(self, orphans: bool) -> None:
        folder = self.root / "files"
        candidates = []
        for entry in _entries(folder):
            if _UPLOAD_TEMP.match(entry.name):
                if self.old(entry):
                    self.remove(entry, "staging")
            elif orphans and entry.name.startswith("file-") and _ID.match(entry.name) and self.old(entry):
                candidates.append(entry)
        known = self.existing(File.id, (entry.name for entry in candidates))
        for entry in candidates:
            if entry.name not in known:
                self.remove(entry, "files")

    def models(self, orphans: bool) -> None:
        candidates = []
        for entry in _entries(self.root / "models"):
            if _MODEL_STAGING.match(entry.name):
                if self.old(entry):
                    self.remove(entry, "staging")
            elif orphans and entry.name.startswith("model-") and _ID.match(entry.name) and self.old(entry):
                candidates.append(entry)
        known = self.existing(Model.id, (entry.name for entry in candidates))
        for entry in candidates:
            if entry.name not in known:
                self.remove(entry, "models")

    def scratch(self) -> None:
        for entry in _entries(self.root / "tmp"):
            if self.old(entry):
                self.remove(entry, "staging")

    def jobs(self, orphans: bool) -> None:
        folders = [entry for entry in _entries(self.root / "jobs") if entry.name.startswith("job-") and _ID.match(entry.name)]
        for start in range(0, len(folders), _BATCH):
            batch = folders[start:start + _BATCH]
            ids = [folder.name for folder in batch]
            recorded: dict[str, set[int]] = {}
            with self.rt.transaction() as session:
                rows = {row.id: row for row in session.execute(
                    select(Job.id, Job.status, Job.params).where(Job.id.in_(ids)))}
                for job_id, step in session.execute(select(Checkpoint.job_id, Checkpoint.step).where(
                        Checkpoint.job_id.in_([name for name in ids if name in rows and rows[name].status in TERMINAL]))):
                    recorded.setdefault(job_id, set()).add(step)
            for folder in batch:
                row = rows.get(folder.name)
                if row is None:
                    if orphans and self.old(folder):
                        self.remove(folder, "jobs")
                    continue
                checkpoints = folder / "checkpoints"
                for entry in _entries(checkpoints):
                    if _CHECKPOINT_TEMP.match(entry.name) and self.old(entry):
                        self.remove(entry, "staging")
                if row.status in TERMINAL:
                    self.finished_job_checkpoints(row.id, row.params or {}, checkpoints, recorded.get(row.id, set()))

    def finished_job_checkpoints(self, job_id: str, params: dict[str, Any], checkpoints: Path,
                                 recorded: set[int]) -> None:
        keep = (params.get("hyperparameters") or {}).get("keep_checkpoints") or self.rt.settings.keep_checkpoints
        doomed: list[str] = []
        if len(recorded) > keep:  # else retention keeps them all
            with self.rt.transaction() as session:
                doomed = retention.prune_checkpoint_rows(session, job_id, keep)
        for doomed_path in doomed:
            self.remove(Path(doomed_path), "checkpoints")
        for step, folder in list_checkpoints(checkpoints):
            if step not in recorded and self.old(folder):  # written by a worker that lost the job meanwhile
                self.remove(folder, "checkpoints")

    def datasets(self) -> None:
        folder = self.root / "datasets"
        by_content: dict[str, list[Path]] = {}
        for entry in _entries(folder):
            sha256 = entry.name.split("-", 1)[0]
            if _SHA256.match(sha256):
                by_content.setdefault(sha256, []).append(entry)
        known = self.existing(File.sha256, by_content)
        for sha256, entries in sorted(by_content.items()):
            if sha256 in known:
                for cache in entries:
                    for entry in _entries(cache):
                        if entry.name.startswith(".prepare-") and self.old(entry):
                            self.remove(entry, "staging")
            elif all(self.old(entry) for entry in entries):
                self.unused_datasets(sha256, entries)

    def unused_datasets(self, sha256: str, entries: list[Path]) -> None:
        """Remove the caches of content no file has any more (and their locks), holding every lock they use."""
        caches = sorted(entry for entry in entries if entry.suffix != ".lock" and entry.is_dir())
        locks = sorted({dataset_lock(cache) for cache in caches} | {entry for entry in entries if entry.suffix == ".lock"})
        with ExitStack() as stack:
            if not all(stack.enter_context(_try_lock(lock)) for lock in locks):
                return  # a job is preparing or loading one of them right now
            with self.rt.transaction() as session:
                if session.scalar(select(exists().where(File.sha256 == sha256))):
                    return  # the same content was uploaded again meanwhile
            for cache in caches:
                self.remove(cache, "datasets")
            for lock in locks:
                try:
                    lock.unlink()  # while holding it: a waiter then finds its file gone and locks the new one
                except OSError:
                    log.warning("could not remove %s", lock, exc_info=True)
                else:
                    if not caches:
                        self.counts["staging"] += 1


def untouched_since(path: Path, cutoff: float) -> bool:
    """Whether nothing in `path` (itself and, for a folder, everything inside it) was written, renamed or
    created after `cutoff` (a time.time() value): the newest of modification and status-change times."""
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            status = os.lstat(current)
        except FileNotFoundError:
            continue
        if max(status.st_mtime, status.st_ctime) > cutoff:
            return False
        if stat.S_ISDIR(status.st_mode):
            stack.extend(_entries(current))
    return True


def _entries(folder: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []


@contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock on `path` if it is free now (True), else False at once; the file is created if missing.
    The same protocol as workers.datasets.locked: a lock file deleted under its holder is not the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield same_file(handle.fileno(), path)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
