"""Training data on the workers: a training file's tokens, prepared once per (content, tokenizer, split) under
ARTIFACT_DIR/datasets/ and shared by every worker and job, behind a file lock."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpt2core import GPT2Tokenizer, load_dataset, prepare_dataset
from gpt2core.data import FORMAT_VERSION, DatasetError, PreparedDataset
from jobs.models import File
from jobs.readers import training_file_is_jsonl

from .runtime import Runtime


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (the dataset cache is shared by every worker). The garbage
    collector (workers.cleanup) deletes a lock file while holding it; whoever waited on the deleted file locks
    the one now at `path` instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if same_file(handle.fileno(), path):
                    yield
                    return
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (not deleted or replaced since it was opened)."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (found.st_dev, found.st_ino)


def dataset_lock(folder: Path) -> Path:
    """The lock file of a dataset cache folder, beside it. (with_suffix drops the split's decimals: the caches of
    one file's content share one lock, "<sha256>-<tokenizer>-v<format>-val0.lock".)"""
    return folder.with_suffix(".lock")


def prepared(rt: Runtime, file: File, val_fraction: float) -> PreparedDataset:
    """The file's tokens, prepared once per (content, tokenizer, split) and reused by every later job; for a
    prompt/completion file also their loss masks (``train_mask``/``val_mask``, None for text), which
    prepare_dataset writes and load_dataset opens by themselves. (The key needs no new format version: text
    datasets are written as before, and no earlier version accepted prompt/completion lines.)"""
    jsonl = training_file_is_jsonl(file.purpose, file.filename)
    # The same bytes read as JSONL or as text make different datasets: the format is part of the key.
    key = f"{file.sha256}-{GPT2Tokenizer.name}-v{FORMAT_VERSION}-{'jsonl' if jsonl else 'text'}-val{val_fraction:g}"
    folder = rt.artifacts.root / "datasets" / key
    with locked(dataset_lock(folder)):
        try:
            return load_dataset(folder)
        except DatasetError:
            pass
        # The format the upload was checked as, read by the same gpt2core.corpus functions.
        prepare_dataset([Path(file.storage_path)], folder, val_fraction=val_fraction,
                        format="jsonl" if jsonl else "text")
        return load_dataset(folder)
