"""Token datasets: stream text/JSONL corpora into uint16 token files, load them back, draw training batches.

On-disk format (``FORMAT_VERSION`` 2), written by :func:`prepare_dataset` into one directory:

* ``train.bin`` / ``val.bin``: raw little-endian ``uint16`` token ids (read them with ``np.memmap``).
* ``meta.json``: token counts, the tokenizer, the split rule and, per source, its sha256 and byte size.
  ``meta.json`` is renamed into place last, so a directory whose ``meta.json`` is present and whose
  ``.bin`` sizes match its counts is complete; :func:`load_dataset` checks both.
* ``train.mask.bin`` / ``val.mask.bin``, only for a dataset with at least one token that is not a loss target
  (a prompt's): one ``uint8`` per token of ``train.bin`` / ``val.bin``, aligned with it, 1 where that token is a
  target (counts in the loss when it is predicted from the tokens before it), 0 where it is not. ``meta.json``
  then names them in ``files`` (``train_mask``, ``val_mask``) and gives ``targets`` (the number of 1s per
  split). A dataset without them (plain text, ``{"text"}`` lines) has every token a target and is byte for byte
  what it was before masks existed.

Documents: a plain-text file is one document; each non-blank line of a JSONL file is one document,
``{"text": "..."}`` or ``{"prompt": "...", "completion": "..."}`` (:func:`gpt2core.corpus.training_record`;
one file may mix both). A text is tokenized whole; a prompt and its completion are tokenized separately and
concatenated (``encode(prompt) + encode(completion)``), so the boundary is exact, and the prompt's tokens get
mask 0. Every non-empty document is followed by the end-of-text token (50256, mask 1: the end of a completion is
learned), so documents are separated by EOT and the last document is terminated by one too. ``"<|endoftext|>"``
appearing inside a text is tokenized as ordinary text, never as the special token.

Split rule (deterministic, per source): of the ``n`` tokens a source produces, the first
``n - ceil(n * val_fraction)`` go to train and the last ``ceil(n * val_fraction)`` go to val.
Train and val are the concatenations of those per-source parts in source order (the masks are cut at the same
offsets, so they stay aligned; a document may straddle the cut). Every non-empty
source therefore contributes at least one val token when ``val_fraction > 0``; with
``val_fraction == 0`` val is empty.

Streaming: text is read in blocks of ``chunk_bytes`` (JSONL a line at a time), decoded with a strict
incremental UTF-8 decoder and cut into pieces at positions where GPT-2's pre-tokenizer always starts a new piece
(a non-whitespace character followed by a whitespace character, see :func:`safe_split_point`),
so the tokens are exactly those of tokenizing each document whole. Pieces are encoded in batches
on a thread pool (``tokenizer.encode_batch``) and appended to disk at once; memory stays bounded
by about ``num_threads * chunk_bytes`` characters of text and their tokens (roughly
``40 * num_threads * chunk_bytes`` bytes, as the tokenizer returns Python lists), whatever the corpus
size; a single JSONL line is held whole. Only a stretch of more than ``max_chunk_chars`` characters without any split point (e.g. no
whitespace at all) is cut arbitrarily, which may tokenize the cut differently.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .corpus import CorpusError, TrainingRecord, iter_text, iter_training_records

# 2: reading rules of gpt2core.corpus (CRLF read as LF in plain text, no duplicate JSON keys). Loss masks did not
# change it: a dataset without masks is written exactly as before, and no version-2 file held prompt/completion
# lines (they were refused).
FORMAT_VERSION = 2
TOKEN_DTYPE = np.uint16
MASK_DTYPE = np.uint8
META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
TRAIN_MASK_FILE = "train.mask.bin"
VAL_MASK_FILE = "val.mask.bin"
IGNORE_INDEX = -100  # a target the loss skips (GPT2.forward's ignore_index)
MASK_RULE = ("one uint8 per token, aligned with the token file: 1 = the token is a loss target, 0 = it is not "
             "(a prompt's token)")
DEFAULT_CHUNK_BYTES = 1 << 17
SPLIT_RULE = "per-source: the last ceil(n * val_fraction) of each source's n tokens go to val, the rest to train"

# Characters GPT-2's regex (Rust `\s`, Unicode White_Space) treats as whitespace. A split point needs a
# character here *after* it and a character for which Python's str.isspace() is False *before* it
# (isspace() is a superset of White_Space, so that side is conservative).
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_BOUNDARY = re.compile(rf"[^\s](?=[{_WHITE_SPACE}])")
_TAIL_WINDOW = 4096


class DatasetError(ValueError):
    """A corpus or dataset that cannot be used; the message names the file (and line, where there is one)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


# --------------------------------------------------------------------------------------------------
# Chunking text without changing its tokenization
# --------------------------------------------------------------------------------------------------


def safe_split_point(text: str, lo: int = 1, hi: int | None = None) -> int | None:
    """The last index ``p`` in ``[lo, hi]`` (``hi`` defaults to ``len(text) - 1``) where ``text`` may be cut
    into ``text[:p]`` and ``text[p:]`` so that tokenizing the two parts separately gives exactly the tokens
    of the whole; None if there is none.

    Such a ``p`` has a non-whitespace character at ``p - 1`` and a whitespace character at ``p``.
    Every GPT-2 pre-token is either a run of whitespace or holds no whitespace except one optional
    leading space, so no pre-token spans such a position; and the pre-tokenizer's regex has no
    look-behind, while its look-aheads (``(?!\\S)``, ``$``) only end whitespace runs, which start at
    ``p`` or later. So the pre-tokens of the whole are those of ``text[:p]`` followed by those of
    ``text[p:]``, and BPE works within pre-tokens.
    """
    lo = max(lo, 1)
    end = len(text) - 1 if hi is None else min(hi, len(text) - 1)
    # Each pass finds split points p with start < p <= end (the match is the character at p - 1).
    window = _TAIL_WINDOW
    while end >= lo:
        start = max(lo - 1, end - window)
        last = None
        for match in _BOUNDARY.finditer(text, start, end + 1):
            last = match
        if last is not None:
            return last.end()
        end = start
        window *= 4
    return None


def chunk_text(text: str, chunk_chars: int, max_chunk_chars: int | None = None) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` characters at safe split points.

    ``"".join(pieces) == text`` always, and the pieces tokenize to the tokens of ``text`` unless a
    stretch longer than ``max_chunk_chars`` (default ``16 * chunk_chars``) has no split point.
    """
    splitter = _Splitter(chunk_chars, max_chunk_chars)
    pieces = list(splitter.feed(text))
    pieces.extend(splitter.flush())
    return pieces


class _Splitter:
    """Incremental :func:`chunk_text`: feed text, get back pieces of at most ``chunk_chars`` characters
    ending at the last split point before that, or when there is none, at the first split point after
    it (at most ``max_chunk_chars``, where the cut is forced)."""

    def __init__(self, chunk_chars: int, max_chunk_chars: int | None = None):
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
        self.chunk_chars = chunk_chars
        self.max_chunk_chars = max(max_chunk_chars or 16 * chunk_chars, chunk_chars)
        self.buffer = ""
        self.pos = 0  # buffer[:pos] has been emitted
        self.searched = 0  # no split point p with pos < p <= searched

    def feed(self, text: str) -> Iterator[str]:
        if self.pos:
            self.buffer, self.searched = self.buffer[self.pos :], max(0, self.searched - self.pos)
            self.pos = 0
        self.buffer += text
        buf, n = self.buffer, len(self.buffer)
        while n - self.pos > self.chunk_chars:
            pos = self.pos
            p = safe_split_point(buf, pos + 1, pos + self.chunk_chars)
            if p is None:
                m = _BOUNDARY.search(buf, max(self.searched, pos + self.chunk_chars), pos + self.max_chunk_chars + 1)
                if m is not None and m.end() < n:
                    p = m.end()
                elif n - pos > self.max_chunk_chars:
                    p = pos + self.max_chunk_chars  # no split point anywhere near: cut anyway
                else:
                    self.searched = max(pos, n - 2)
                    return
            self.pos = p
            self.searched = p
            yield buf[pos:p]

    def flush(self) -> Iterator[str]:
        if self.pos < len(self.buffer):
            yield self.buffer[self.pos :]
        self.buffer = ""
        self.pos = self.searched = 0


# --------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------


@dataclass
class SourceInfo:
    path: str
    format: str
    sha256: str
    bytes: int
    documents: int
    tokens: int
    train_tokens: int
    val_tokens: int


@dataclass
class DatasetInfo:
    """What :func:`prepare_dataset` wrote (also the content of meta.json)."""

    out_dir: str
    train_tokens: int
    val_tokens: int
    total_tokens: int
    sources: list[SourceInfo] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def train_path(self) -> Path:
        return Path(self.out_dir) / TRAIN_FILE

    @property
    def val_path(self) -> Path:
        return Path(self.out_dir) / VAL_FILE

    @property
    def meta_path(self) -> Path:
        return Path(self.out_dir) / META_FILE

    @property
    def masked(self) -> bool:
        """Whether the dataset has loss masks (``train.mask.bin``/``val.mask.bin``): some token is no target."""
        return "train_mask" in self.meta.get("files", {})


def detect_format(path: str | Path) -> str:
    """"jsonl" for .jsonl/.ndjson (and .json, read as one JSON object per line), else "text"."""
    suffix = Path(path).suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".ndjson", ".json") else "text"


class _HashingReader:
    """Reads a binary file while hashing and counting every byte read."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self.f.readline(limit)
        self.sha256.update(data)
        self.size += len(data)
        return data


def _corpus_error(path: Path, exc: CorpusError) -> DatasetError:
    return DatasetError(f"{path}:{exc.line}: {exc.reason}", path, exc.line)


def _text_documents(path: Path, reader: _HashingReader, chunk_bytes: int, max_chunk_chars: int):
    """The pieces of a plain-text file (one document), read by :func:`gpt2core.corpus.iter_text` and cut at
    safe split points."""
    splitter = _Splitter(chunk_bytes, max_chunk_chars)
    try:
        for text in iter_text(reader, chunk_bytes):
            yield from splitter.feed(text)
    except CorpusError as exc:
        raise _corpus_error(path, exc) from None
    yield from splitter.flush()


def _jsonl_documents(path: Path, reader: _HashingReader) -> Iterator[TrainingRecord]:
    """The record of each non-blank line, by :func:`gpt2core.corpus.iter_training_records`."""
    try:
        yield from iter_training_records(reader, DEFAULT_CHUNK_BYTES)
    except CorpusError as exc:
        raise _corpus_error(path, exc) from None


class _TokenSink:
    """Encodes pieces in batches on the tokenizer's thread pool and appends uint16 tokens to a file, and their
    loss-mask entries to `mask` (1 for a target piece or an EOT, 0 for a prompt piece)."""

    def __init__(self, f, tokenizer, num_threads: int, batch_chars: int, mask: _LazyMask):
        self.f = f
        self.tokenizer = tokenizer
        self.num_threads = num_threads
        self.batch_chars = batch_chars
        self.mask = mask
        self.pending: list[tuple[str | None, bool]] = []  # (piece, is a target); None stands for an EOT token
        self.pending_chars = 0
        self.tokens = 0

    def add_text(self, piece: str, target: bool = True) -> None:
        if piece:
            self.pending.append((piece, target))
            self.pending_chars += len(piece)
            if self.pending_chars >= self.batch_chars:
                self.flush()

    def add_eot(self) -> None:
        self.pending.append((None, True))

    def flush(self) -> None:
        texts = [p for p, _ in self.pending if p is not None]
        encoded = iter(self.tokenizer.encode_batch(texts, num_threads=self.num_threads) if texts else [])
        eot = int(self.tokenizer.eot_id)
        out: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for p, target in self.pending:
            ids = [eot] if p is None else next(encoded)
            out.append(np.asarray(ids, dtype=TOKEN_DTYPE))
            masks.append(np.full(len(ids), 1 if target else 0, dtype=MASK_DTYPE))
        if out:
            arr = np.concatenate(out)
            arr.astype("<u2", copy=False).tofile(self.f)
            self.mask.add(np.concatenate(masks))
            self.tokens += int(arr.size)
        self.pending = []
        self.pending_chars = 0


class _LazyMask:
    """A loss-mask file (uint8 per token) that is created only once it would hold a 0 (or on :meth:`start`):
    until then it just counts its entries, all 1s, and writes them when it starts. So a corpus without prompts
    writes no mask at all."""

    def __init__(self, path: Path):
        self.path = path
        self.f = None
        self.length = 0  # entries so far, written or not
        self.targets = 0  # the 1s among them

    @property
    def started(self) -> bool:
        return self.f is not None

    def start(self) -> None:
        if self.f is None:
            self.f = open(self.path, "wb")
            _write_ones(self.f, self.length)

    def add(self, mask: np.ndarray) -> None:
        ones = int(np.count_nonzero(mask))
        if ones < mask.size:
            self.start()
        if self.f is not None:
            mask.astype(MASK_DTYPE, copy=False).tofile(self.f)
        self.length += int(mask.size)
        self.targets += ones

    def add_ones(self, n: int) -> None:
        if self.f is not None:
            _write_ones(self.f, n)
        self.length += n
        self.targets += n

    def copy_from(self, src, n: int, buf_size: int = 1 << 22) -> None:
        """Append the next `n` entries of the binary mask file `src` (starting this file)."""
        self.start()
        while n > 0:
            data = src.read(min(buf_size, n))
            if not data:
                raise DatasetError(f"unexpected end of temporary mask file {getattr(src, 'name', src)}")
            self.f.write(data)
            self.targets += int(np.count_nonzero(np.frombuffer(data, dtype=MASK_DTYPE)))
            self.length += len(data)
            n -= len(data)

    def __enter__(self) -> "_LazyMask":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, sync: bool = False) -> None:
        if self.f is not None and not self.f.closed:
            if sync:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()


def _write_ones(f, n: int, buf_size: int = 1 << 20) -> None:
    ones = np.ones(min(n, buf_size), dtype=MASK_DTYPE)
    while n > 0:
        ones[: min(n, buf_size)].tofile(f)
        n -= min(n, buf_size)


def _copy_range(src, dst, nbytes: int, buf_size: int = 1 << 22) -> None:
    while nbytes > 0:
        data = src.read(min(buf_size, nbytes))
        if not data:
            raise DatasetError(f"unexpected end of temporary token file {getattr(src, 'name', src)}")
        dst.write(data)
        nbytes -= len(data)


def prepare_dataset(
    sources: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    val_fraction: float = 0.1,
    tokenizer=None,
    *,
    format: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_chunk_chars: int | None = None,
    num_threads: int = 8,
) -> DatasetInfo:
    """Tokenize text/JSONL ``sources`` into ``out_dir``/{train.bin, val.bin, meta.json}, plus
    {train.mask.bin, val.mask.bin} when some token is not a loss target (a prompt's); see the module doc.

    ``format`` is "text", "jsonl" or None (by extension: .jsonl/.ndjson/.json are JSONL, anything else
    is plain text). ``chunk_bytes`` bounds how much is read and encoded at a time. Raises
    :class:`DatasetError` naming the file and line for unreadable input, and for an empty corpus.
    Existing dataset files in ``out_dir`` are replaced.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sources = [Path(s) for s in sources]
    if not sources:
        raise DatasetError("no sources given")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if format not in (None, "text", "jsonl"):
        raise ValueError(f"format must be 'text', 'jsonl' or None, got {format!r}")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    if tokenizer is None:
        from .tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer()
    vocab_size = getattr(tokenizer, "vocab_size", None)
    if vocab_size is not None and vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"tokenizer vocabulary ({vocab_size}) does not fit in {np.dtype(TOKEN_DTYPE).name}")
    for path in sources:
        if not path.exists():
            raise DatasetError(f"{path}: no such file", path)
        if not path.is_file():
            raise DatasetError(f"{path}: not a regular file", path)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    # Written only once some source has a masked token (then with the 1s of every token before it too).
    train_mask, val_mask = _LazyMask(tmp / TRAIN_MASK_FILE), _LazyMask(tmp / VAL_MASK_FILE)
    try:
        train_tmp, val_tmp = tmp / TRAIN_FILE, tmp / VAL_FILE
        infos: list[SourceInfo] = []
        with open(train_tmp, "wb") as train_f, open(val_tmp, "wb") as val_f:
            for path in sources:
                fmt = format or detect_format(path)
                src_tmp, src_mask_tmp = tmp / "source.bin", tmp / "source.mask.bin"
                with open(path, "rb") as raw, open(src_tmp, "wb") as sf, _LazyMask(src_mask_tmp) as src_mask:
                    reader = _HashingReader(raw)
                    sink = _TokenSink(sf, tokenizer, num_threads, max(1, num_threads) * chunk_bytes, src_mask)
                    documents = 0
                    if fmt == "text":
                        any_text = False
                        for piece in _text_documents(path, reader, chunk_bytes, max_chunk_chars):
                            any_text = any_text or bool(piece)
                            sink.add_text(piece)
                        if any_text:
                            sink.add_eot()
                            documents = 1
                    else:
                        for record in _jsonl_documents(path, reader):
                            if record.empty:
                                continue
                            # Prompt and completion are tokenized apart: no token spans the boundary.
                            for text, target in ((record.prompt, False), (record.completion, True)):
                                pieces = chunk_text(text, chunk_bytes, max_chunk_chars) if len(text) > chunk_bytes else [text]
                                for piece in pieces:
                                    sink.add_text(piece, target)
                            sink.add_eot()
                            documents += 1
                    sink.flush()
                    n = sink.tokens
                n_val = math.ceil(n * val_fraction) if val_fraction > 0 else 0
                n_train = n - n_val
                item_size = np.dtype(TOKEN_DTYPE).itemsize
                copy_buf = max(chunk_bytes, 1 << 16)
                with open(src_tmp, "rb") as sf:
                    _copy_range(sf, train_f, n_train * item_size, copy_buf)
                    _copy_range(sf, val_f, n_val * item_size, copy_buf)
                src_tmp.unlink()
                if src_mask.started:  # the mask is cut where the tokens are: it stays aligned
                    with open(src_mask_tmp, "rb") as mf:
                        train_mask.copy_from(mf, n_train, copy_buf)
                        val_mask.copy_from(mf, n_val, copy_buf)
                    src_mask_tmp.unlink()
                else:
                    train_mask.add_ones(n_train)
                    val_mask.add_ones(n_val)
                infos.append(
                    SourceInfo(
                        path=str(path),
                        format=fmt,
                        sha256=reader.sha256.hexdigest(),
                        bytes=reader.size,
                        documents=documents,
                        tokens=n,
                        train_tokens=n_train,
                        val_tokens=n_val,
                    )
                )
            train_f.flush()
            os.fsync(train_f.fileno())
            val_f.flush()
            os.fsync(val_f.fileno())
        masked = train_mask.started or val_mask.started
        if masked:
            train_mask.start()
            val_mask.start()
        train_mask.close(sync=True)
        val_mask.close(sync=True)

        total = sum(s.tokens for s in infos)
        if total == 0:
            names = ", ".join(str(p) for p in sources)
            raise DatasetError(f"empty corpus: no tokens in {names}", sources[0])
        train_n = sum(s.train_tokens for s in infos)
        val_n = sum(s.val_tokens for s in infos)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
            "vocab_size": vocab_size,
            "eot_id": int(tokenizer.eot_id),
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "byte_order": "little",
            "val_fraction": val_fraction,
            "split": SPLIT_RULE,
            "documents": "each plain-text file is one document, each non-blank JSONL line one document; "
            "every document is followed by eot_id",
            "tokens": {"train": train_n, "val": val_n, "total": total},
            "files": {"train": TRAIN_FILE, "val": VAL_FILE},
            "sources": [asdict(s) for s in infos],
        }
        if masked:  # plain-text datasets' meta.json stays what it was before masks existed
            meta["files"].update(train_mask=TRAIN_MASK_FILE, val_mask=VAL_MASK_FILE)
            meta["mask"] = {"dtype": np.dtype(MASK_DTYPE).name, "rule": MASK_RULE,
                            "prompts": "the tokens of a prompt/completion record's prompt are 0; its completion's "
                            "and the eot_id after it are 1, as are all tokens of texts"}
            meta["targets"] = {"train": train_mask.targets, "val": val_mask.targets}
        meta_tmp = tmp / META_FILE
        with open(meta_tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # Publish: drop any old meta.json first, so at no moment does a meta.json describe other .bin files.
        (out / META_FILE).unlink(missing_ok=True)
        os.replace(train_tmp, out / TRAIN_FILE)
        os.replace(val_tmp, out / VAL_FILE)
        for name in (TRAIN_MASK_FILE, VAL_MASK_FILE):
            if masked:
                os.replace(tmp / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)  # an earlier dataset's
        os.replace(meta_tmp, out / META_FILE)
        _fsync_dir(out)
    finally:
        train_mask.close()
        val_mask.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return DatasetInfo(
        out_dir=str(out), train_tokens=train_n, val_tokens=val_n, total_tokens=total, sources=infos, meta=meta
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Loading prepared datasets
# --------------------------------------------------------------------------------------------------


@dataclass
class PreparedDataset:
    """A prepared dataset: token arrays (N,) uint16, and for a dataset with prompts their loss masks (N,) uint8
    (1: the token is a target), aligned with them; the masks are None when every token is a target."""

    path: Path
    train: np.ndarray  # np.memmap of uint16 (a plain empty array when there are no tokens)
    val: np.ndarray
    meta: dict[str, Any]
    train_mask: np.ndarray | None = None  # np.memmap of uint8, or None (plain text: every token a target)
    val_mask: np.ndarray | None = None


def open_tokens(path: str | Path) -> np.ndarray:
    """A read-only uint16 memmap of a token file (an empty array for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such token file", path)
    size = path.stat().st_size
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise DatasetError(f"{path}: size {size} is not a whole number of uint16 tokens", path)
    if size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype="<u2", mode="r")


def open_mask(path: str | Path) -> np.ndarray:
    """A read-only uint8 memmap of a loss-mask file (an empty array for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such mask file", path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=MASK_DTYPE)
    return np.memmap(path, dtype=MASK_DTYPE, mode="r")


def load_dataset(out_dir: str | Path) -> PreparedDataset:
    """Open a directory written by :func:`prepare_dataset`, checking it is complete: its tokens, and its loss
    masks when meta.json names them (``PreparedDataset.train_mask``/``val_mask``, else None)."""
    out = Path(out_dir)
    meta_path = out / META_FILE
    if not meta_path.is_file():
        raise DatasetError(f"{out}: no {META_FILE} (not a prepared dataset, or preparation did not finish)", meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{meta_path}: not valid JSON: {exc}", meta_path) from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{meta_path}: unsupported dataset format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}",
            meta_path,
        )
    if meta.get("dtype") != np.dtype(TOKEN_DTYPE).name:
        raise DatasetError(f"{meta_path}: unsupported dtype {meta.get('dtype')!r}", meta_path)
    arrays = {}
    for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
        arr = open_tokens(out / name)
        expected = meta["tokens"][split]
        if arr.size != expected:
            raise DatasetError(f"{out / name}: has {arr.size} tokens but {META_FILE} says {expected}", out / name)
        arrays[split] = arr
    masks: dict[str, np.ndarray | None] = {"train": None, "val": None}
    files = meta.get("files", {})
    if "train_mask" in files or "val_mask" in files:
        for split in ("train", "val"):
            name = files.get(f"{split}_mask")
            if not isinstance(name, str) or Path(name).name != name:
                raise DatasetError(f"{meta_path}: files.{split}_mask must name a mask file, got {name!r}", meta_path)
            mask = open_mask(out / name)
            if mask.size != arrays[split].size:
                raise DatasetError(f"{out / name}: has {mask.size} entries but the {split} split has "
                                   f"{arrays[split].size} tokens", out / name)
            masks[split] = mask
    return PreparedDataset(path=out, train=arrays["train"], val=arrays["val"], meta=meta,
                           train_mask=masks["train"], val_mask=masks["val"])


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def as_token_array(data) -> np.ndarray:
    """A 1-D integer array (memmaps and arrays pass through) from a path, array, memmap or tensor."""
    if isinstance(data, (str, Path)):
        return open_tokens(data)
    if isinstance(data, torch.Tensor):
        if data.dim() != 1:
            raise ValueError(f"token tensor must be 1-D, got shape {tuple(data.shape)}")
        return data.detach().cpu().numpy()
    arr = data if isinstance(data, np.ndarray) else np.asarray(data)
    if arr.ndim != 1:
        raise ValueError(f"token array must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token array must hold integers, got {arr.dtype}")
    return arr


def as_mask_array(mask, num_tokens: int) -> np.ndarray:
    """A 1-D loss mask aligned with a token array of `num_tokens` tokens (memmaps and arrays pass through), from
    a path of a uint8 mask file, an integer or bool array, a memmap or a tensor: nonzero means the token is a
    target. ValueError when it is not 1-D or its length differs from `num_tokens`."""
    if isinstance(mask, (str, Path)):
        arr = open_mask(mask)
    elif isinstance(mask, torch.Tensor):
        arr = mask.detach().cpu().numpy()
    else:
        arr = mask if isinstance(mask, np.ndarray) else np.asarray(mask)
    if arr.ndim != 1:
        raise ValueError(f"loss mask must be 1-D, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"loss mask must hold integers or bools, got {arr.dtype}")
    if arr.size != num_tokens:
        raise ValueError(f"loss mask has {arr.size} entries, but there are {num_tokens} tokens")
    return arr


def masked_targets(targets: torch.Tensor, window_masks: np.ndarray) -> torch.Tensor:
    """`targets` (B, T) with -100 (GPT2's ignore_index) where the target token's mask is 0. `window_masks`
    (B, T + 1) are the masks of the windows' tokens, aligned with ``windows`` (targets are tokens 1..T)."""
    drop = torch.from_numpy(np.ascontiguousarray(window_masks[:, 1:] == 0))
    return targets.masked_fill(drop, IGNORE_INDEX)


def eval_window_starts(num_tokens: int, block_size: int, max_windows: int) -> np.ndarray:
    """Where the evaluation windows of a validation split of `num_tokens` tokens start: its non-overlapping
    `block_size` windows in order (window k reads tokens [k*T, k*T + T] as inputs and targets), all of them when
    there are at most `max_windows`, else `max_windows` of them evenly spread (window floor(j * n / max_windows)
    for j = 0 .. max_windows - 1). It depends on nothing else, no seed: every run scoring the same split with the
    same block size scores the same tokens, so their validation losses compare. int64 offsets, possibly empty."""
    n = max(num_tokens - 1, 0) // block_size
    index = np.arange(n, dtype=np.int64) if n <= max_windows else (np.arange(max_windows, dtype=np.int64) * n) // max_windows
    return index * block_size


class BatchLoader:
    """Random (B, T) windows of a token array and their next-token targets, reproducible from a seed.

    Batch ``i`` is drawn with ``np.random.default_rng([seed, i])``: its state is just the number of
    batches drawn so far (``position``), so ``state_dict()``/``load_state_dict()`` restore it exactly.
    Returns int64 CPU tensors ``(x, y)``; ``y[:, t] == x[:, t + 1]`` within a window.

    ``mask`` (optional): a loss mask aligned with ``data`` (:func:`as_mask_array`; e.g.
    ``PreparedDataset.train_mask``): where the token ``y[:, t]`` has mask 0 (a prompt's token), ``y[:, t]`` is
    -100 instead, the model's ``ignore_index``, so it is no target. The windows drawn do not depend on the mask.
    """

    def __init__(self, data, block_size: int, batch_size: int, seed: int = 0, mask=None):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.data = as_token_array(data)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.position = 0
        self.mask = None if mask is None else as_mask_array(mask, len(self.data))
        n = len(self.data)
        if n < block_size + 1:
            where = f" ({data})" if isinstance(data, (str, Path)) else ""
            raise DatasetError(
                f"dataset{where} has {n} tokens; block_size {block_size} needs at least {block_size + 1}",
                data if isinstance(data, (str, Path)) else None,
            )

    def __len__(self) -> int:
        return len(self.data)

    @property
    def num_tokens(self) -> int:
        return len(self.data)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``index`` (does not move the position)."""
        rng = np.random.default_rng([self.seed, index])
        T = self.block_size
        starts = rng.integers(0, len(self.data) - T, size=self.batch_size)
        windows = np.stack([np.asarray(self.data[s : s + T + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(windows)
        if self.mask is None:
            return w[:, :-1], w[:, 1:]
        masks = np.stack([np.asarray(self.mask[s : s + T + 1]) for s in starts])
        return w[:, :-1], masked_targets(w[:, 1:], masks)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.position)
        self.position += 1
        return out

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def reset(self, position: int = 0) -> None:
        self.position = position

    def state_dict(self) -> dict[str, int]:
        return {
            "position": self.position,
            "seed": self.seed,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "num_tokens": len(self.data),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "block_size", "batch_size", "num_tokens"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]}, but this loader has {key}={self.state_dict()[key]}"
                )
        position = state["position"]
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"loader position must be a non-negative integer, got {position!r}")
        self.position = position


TokenDataset = BatchLoader
