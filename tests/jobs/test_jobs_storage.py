from __future__ import annotations

import hashlib
import io

import pytest

from jobs.errors import InvalidInput, TooLarge
from jobs.storage import CHUNK_BYTES, ArtifactStore


class CountingStream(io.RawIOBase):
    """Produces `total` bytes of a repeating pattern without holding them, recording the largest read."""

    def __init__(self, total: int) -> None:
        self.remaining = total
        self.largest_read = 0
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        self.largest_read = max(self.largest_read, size)
        n = self.remaining if size < 0 else min(size, self.remaining)
        chunk = (b"0123456789abcde\n" * (n // 16 + 1))[:n]
        self.remaining -= n
        self.digest.update(chunk)
        return chunk


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def test_paths_per_kind(store):
    assert store.file_path("file-abc") == store.root / "files" / "file-abc"
    assert store.model_dir("model-abc") == store.root / "models" / "model-abc"
    assert store.checkpoint_dir("job-abc") == store.root / "jobs" / "job-abc" / "checkpoints"


@pytest.mark.parametrize("bad_id", ["../etc", "file-../../x", "file-a/b", "", "FILE-1"])
def test_unsafe_ids_are_refused(store, bad_id):
    with pytest.raises(ValueError):
        store.file_path(bad_id)


def test_write_stream_hashes_counts_and_reads_in_bounded_chunks(store):
    stream = CountingStream(3 * CHUNK_BYTES + 5)
    blob = store.write_stream(store.file_path("file-big"), stream, max_bytes=4 * CHUNK_BYTES)
    assert blob.bytes == 3 * CHUNK_BYTES + 5
    assert blob.sha256 == stream.digest.hexdigest()
    assert blob.path.stat().st_size == blob.bytes
    assert 0 < stream.largest_read <= CHUNK_BYTES
    assert blob.lines == (3 * CHUNK_BYTES + 5 + 15) // 16  # the last, partial line counts too
    assert [p.name for p in blob.path.parent.iterdir()] == ["file-big"]  # no temporary left


@pytest.mark.parametrize("data,lines", [(b"", 0), (b"a", 1), (b"a\n", 1), (b"a\nb", 2), (b"\n\n", 2)])
def test_line_count(store, data, lines):
    blob = store.write_stream(store.file_path("file-x"), io.BytesIO(data), max_bytes=100)
    assert (blob.lines, blob.bytes, blob.sha256) == (lines, len(data), hashlib.sha256(data).hexdigest())
    assert blob.path.read_bytes() == data


def test_exactly_the_limit_is_accepted_one_more_byte_is_not(store):
    assert store.write_stream(store.file_path("file-ok"), io.BytesIO(b"x" * 10), max_bytes=10).bytes == 10
    with pytest.raises(TooLarge) as raised:
        store.write_stream(store.file_path("file-big"), io.BytesIO(b"x" * 11), max_bytes=10)
    assert isinstance(raised.value, InvalidInput) and raised.value.code == "too_large"
    assert sorted(p.name for p in (store.root / "files").iterdir()) == ["file-ok"]


def test_failed_write_leaves_an_existing_file_untouched(store):
    dest = store.file_path("file-keep")
    store.write_stream(dest, io.BytesIO(b"original"), max_bytes=100)
    with pytest.raises(TooLarge):
        store.write_stream(dest, CountingStream(2 * CHUNK_BYTES), max_bytes=CHUNK_BYTES)
    assert dest.read_bytes() == b"original"
    assert [p.name for p in dest.parent.iterdir()] == ["file-keep"]


def test_delete_files_directories_and_missing_paths(store, tmp_path):
    dest = store.file_path("file-gone")
    store.write_stream(dest, io.BytesIO(b"x"), max_bytes=10)
    store.delete(dest)
    assert not dest.exists()
    store.delete(dest)  # already gone: fine
    checkpoints = store.checkpoint_dir("job-gone")
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-1").write_bytes(b"w")
    store.delete(store.job_dir("job-gone"))
    assert not store.job_dir("job-gone").exists()
    with pytest.raises(ValueError):
        store.delete(tmp_path / "elsewhere")
