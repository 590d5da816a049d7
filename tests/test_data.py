"""Dataset preparation (streaming, exact tokenization, split, errors, atomicity) and the batch loader."""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2core import data as data_mod
from gpt2core.data import (
    FORMAT_VERSION,
    BatchLoader,
    DatasetError,
    chunk_text,
    load_dataset,
    prepare_dataset,
    safe_split_point,
)

EOT = 50256


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def read_tokens(path: Path) -> list[int]:
    if path.stat().st_size == 0:
        return []
    return np.memmap(path, dtype=np.uint16, mode="r").tolist()


# --------------------------------------------------------------------------------------------------
# Token files and meta.json
# --------------------------------------------------------------------------------------------------


def test_text_and_jsonl_sources(tmp_path, tokenizer):
    text = "Hello world.\nThis is the first document.\n\nIt has two paragraphs.\n"
    docs = ["A JSONL document.", "Another one, with\nnewlines\n", 'Quotes " and <|endoftext|> stay text']
    a = write(tmp_path / "a.txt", text)
    b = write(
        tmp_path / "b.jsonl",
        json.dumps({"text": docs[0]}) + "\n\n" + json.dumps({"text": docs[1], "id": 7}) + "\n"
        + json.dumps({"text": docs[2]}) + "\n   \n",
    )
    out = tmp_path / "ds"
    info = prepare_dataset([a, b], out, val_fraction=0.0, tokenizer=tokenizer)

    expected = tokenizer.encode(text) + [EOT]
    for d in docs:
        expected += tokenizer.encode(d) + [EOT]
    assert read_tokens(out / "train.bin") == expected
    assert (out / "val.bin").stat().st_size == 0
    assert (out / "train.bin").stat().st_size == 2 * len(expected)  # uint16
    assert np.memmap(out / "train.bin", dtype=np.uint16, mode="r").dtype == np.uint16

    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["tokenizer"] == "gpt2"
    assert meta["dtype"] == "uint16"
    assert meta["eot_id"] == EOT
    assert meta["val_fraction"] == 0.0
    assert meta["tokens"] == {"train": len(expected), "val": 0, "total": len(expected)}
    sources = meta["sources"]
    assert [s["path"] for s in sources] == [str(a), str(b)]
    assert [s["format"] for s in sources] == ["text", "jsonl"]
    assert [s["documents"] for s in sources] == [1, 3]
    for s, p in zip(sources, (a, b)):
        assert s["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert s["bytes"] == p.stat().st_size
    assert info.total_tokens == len(expected) and info.train_tokens == len(expected) and info.val_tokens == 0
    assert info.meta == meta

    ds = load_dataset(out)
    assert ds.train.tolist() == expected and len(ds.val) == 0 and ds.meta == meta
    # Only the three dataset files remain: no temporary files.
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_explicit_format_overrides_extension(tmp_path, tokenizer):
    src = write(tmp_path / "docs.txt", '{"text": "one"}\n{"text": "two"}\n')
    prepare_dataset(src, tmp_path / "ds", val_fraction=0.0, format="jsonl")
    assert load_dataset(tmp_path / "ds").train.tolist() == tokenizer.encode("one") + [EOT] + tokenizer.encode("two") + [EOT]
    prepare_dataset(src, tmp_path / "ds2", val_fraction=0.0, format="text")
    assert load_dataset(tmp_path / "ds2").train.tolist() == tokenizer.encode(src.read_text()) + [EOT]


def test_split_is_per_source_and_deterministic(tmp_path, tokenizer):
    a = write(tmp_path / "a.txt", "alpha beta gamma delta\n" * 40)
    b = write(tmp_path / "b.jsonl", "".join(json.dumps({"text": f"doc {i} says hi"}) + "\n" for i in range(30)))
    info = prepare_dataset([a, b], tmp_path / "one", val_fraction=0.15, chunk_bytes=64)
    prepare_dataset([a, b], tmp_path / "two", val_fraction=0.15, chunk_bytes=4096)

    ta = tokenizer.encode(a.read_text()) + [EOT]
    tb = [t for i in range(30) for t in tokenizer.encode(f"doc {i} says hi") + [EOT]]
    va, vb = math.ceil(len(ta) * 0.15), math.ceil(len(tb) * 0.15)
    ds = load_dataset(tmp_path / "one")
    assert ds.train.tolist() == ta[: len(ta) - va] + tb[: len(tb) - vb]
    assert ds.val.tolist() == ta[len(ta) - va :] + tb[len(tb) - vb :]
    assert ds.meta["tokens"] == {"train": len(ta) + len(tb) - va - vb, "val": va + vb, "total": len(ta) + len(tb)}
    assert [(s["train_tokens"], s["val_tokens"]) for s in info.meta["sources"]] == [
        (len(ta) - va, va),
        (len(tb) - vb, vb),
    ]
    for name in ("train.bin", "val.bin", "meta.json"):  # same bytes whatever the chunking
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_val_nonempty_for_tiny_corpus_and_empty_without_fraction(tmp_path):
    src = write(tmp_path / "tiny.txt", "hi")
    info = prepare_dataset(src, tmp_path / "ds", val_fraction=0.01)
    assert info.val_tokens == 1 and info.train_tokens == 1  # "hi" + EOT: ceil(2 * 0.01) = 1 val token
    info = prepare_dataset(src, tmp_path / "ds0", val_fraction=0.0)
    assert info.val_tokens == 0 and load_dataset(tmp_path / "ds0").val.size == 0


def test_prepare_replaces_existing_dataset_and_keeps_it_on_failure(tmp_path):
    out = tmp_path / "ds"
    prepare_dataset(write(tmp_path / "a.txt", "first corpus\n"), out, val_fraction=0.0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write(tmp_path / "bad.txt", b"fine\n\xff\n")
    with pytest.raises(DatasetError):
        prepare_dataset([tmp_path / "a.txt", bad], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no temporary leftovers
    prepare_dataset(write(tmp_path / "b.txt", "second corpus, longer\n"), out, val_fraction=0.0)
    assert load_dataset(out).meta["sources"][0]["path"].endswith("b.txt")


def test_load_dataset_rejects_incomplete_directories(tmp_path):
    out = tmp_path / "ds"
    prepare_dataset(write(tmp_path / "a.txt", "some text here\n" * 10), out, val_fraction=0.2)
    train = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(train[:-2])
    with pytest.raises(DatasetError, match="train.bin"):
        load_dataset(out)
    (out / "meta.json").unlink()
    with pytest.raises(DatasetError, match="meta.json"):
        load_dataset(out)


# --------------------------------------------------------------------------------------------------
# Streaming and exact chunked tokenization
# --------------------------------------------------------------------------------------------------


def corpus_text(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "The", "quick", "brown", "fox", "don't", "we'll", "1984", "3.14", "naïve", "café", "東京",
             "emoji😀", "  indented", "tab\there", "x=y+z;", "(parens)", "'quoted'", "--", "!!", "\u00a0nbsp"]
    lines = []
    for _ in range(n_lines):
        k = int(rng.integers(0, 14))
        lines.append(" ".join(words[i] for i in rng.integers(0, len(words), size=k)))
        if rng.random() < 0.1:
            lines.append("")  # paragraph break
    return "\n".join(lines) + "\n"


def test_streaming_bounds_reads_and_memory(tmp_path, tokenizer, monkeypatch):
    text = corpus_text(60_000)
    src = write(tmp_path / "big.txt", text)
    size = src.stat().st_size
    assert size > 2_000_000
    chunk = 8 * 1024
    reads = []
    real_read = data_mod._HashingReader.read

    def recording_read(self, n):
        reads.append(n)
        return real_read(self, n)

    monkeypatch.setattr(data_mod._HashingReader, "read", recording_read)
    tracemalloc.start()
    try:
        info = prepare_dataset(src, tmp_path / "ds", val_fraction=0.0, chunk_bytes=chunk, num_threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(reads) <= chunk and len(reads) >= size // chunk
    # Text and tokens held at once stay around num_threads * chunk_bytes, far below the file size.
    assert peak < size / 4, (peak, size)
    # ... and chunking did not change a single token.
    expected = tokenizer.encode(text) + [EOT]
    assert info.total_tokens == len(expected)
    assert load_dataset(tmp_path / "ds").train.tolist() == expected


def test_chunk_text_cuts_at_safe_points(tokenizer):
    text = corpus_text(300, seed=1)
    for chunk in (1, 5, 17, 100, 1000):
        pieces = chunk_text(text, chunk, max_chunk_chars=10**9)
        assert "".join(pieces) == text
        assert all(pieces)
        assert [t for p in pieces for t in tokenizer.encode(p)] == tokenizer.encode(text)
        if chunk >= 100:
            assert max(len(p) for p in pieces) <= chunk  # this text has split points everywhere
    assert safe_split_point("abc def") == 3
    assert safe_split_point("   \n\n") is None
    assert safe_split_point("word") is None


def test_text_without_split_points_is_cut_but_kept_intact(tmp_path, tokenizer):
    text = "x" * 5000 + " tail"
    pieces = chunk_text(text, 100, max_chunk_chars=1000)
    assert "".join(pieces) == text and max(len(p) for p in pieces) <= 1000
    src = write(tmp_path / "long.txt", text)
    info = prepare_dataset(src, tmp_path / "ds", val_fraction=0.0, chunk_bytes=100, max_chunk_chars=1000)
    assert tokenizer.decode(load_dataset(tmp_path / "ds").train.tolist()[:-1]) == text
    assert info.total_tokens > 0


# Fragments chosen to exercise every branch of GPT-2's pre-tokenizer: contractions, letters, digits,
# punctuation, whitespace runs (ASCII and Unicode White_Space), characters Python calls whitespace but the
# regex does not (\x1c-\x1f), multi-byte UTF-8, and "<|endoftext|>" as plain text.
FRAGMENTS = [
    "a", "Z", "é", "東", "😀", "1", "23", ".", ",", "!", "?", "-", "'", "'s", "'ll", "'re", "don't", "<|endoftext|>",
    " ", "  ", "\n", "\n\n", "\r\n", "\t", "\x0b", "\x0c", "\x85", "\u00a0", "\u2028", "\u3000", "\u2003",
    "\x1c", "\x1f", "\u200b", "\ufeff", "hello", " world", "Hello,", " 42",
]
texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join),
    st.text(max_size=80),
)


@settings(max_examples=300, deadline=None)
@given(text=texts, chunk=st.integers(min_value=1, max_value=40))
def test_property_chunking_never_changes_tokens(tokenizer, text, chunk):
    pieces = chunk_text(text, chunk, max_chunk_chars=10**9)
    assert "".join(pieces) == text
    assert [t for p in pieces for t in tokenizer.encode(p)] == tokenizer.encode(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts.filter(lambda s: s.lstrip("\ufeff") != ""), chunk=st.integers(min_value=1, max_value=24))
def test_property_streamed_file_equals_whole_text(tokenizer, text, chunk):
    with tempfile.TemporaryDirectory() as d:
        src = write(Path(d) / "t.txt", text)
        prepare_dataset(src, Path(d) / "ds", val_fraction=0.0, chunk_bytes=chunk, max_chunk_chars=10**9)
        whole = text[1:] if text.startswith("\ufeff") else text  # a leading byte-order mark is dropped
        whole = whole.replace("\r\n", "\n")  # CRLF line endings read as LF (gpt2core.corpus)
        assert load_dataset(Path(d) / "ds").train.tolist() == tokenizer.encode(whole) + [EOT]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2, 1 << 16])
def test_invalid_utf8_names_file_and_line(tmp_path, chunk):
    src = write(tmp_path / "bad.txt", "line one\nline two\n".encode() + b"caf\xc3(\n" + b"line four\n")
    with pytest.raises(DatasetError) as exc:
        prepare_dataset(src, tmp_path / "ds", chunk_bytes=chunk)
    assert isinstance(exc.value, ValueError)
    assert f"{src}:3:" in str(exc.value) and "UTF-8" in str(exc.value)
    assert exc.value.path == str(src) and exc.value.line == 3
    assert not (tmp_path / "ds" / "meta.json").exists()
    assert list((tmp_path / "ds").iterdir()) == []


def test_truncated_utf8_at_end_of_file(tmp_path):
    src = write(tmp_path / "cut.txt", b"ok\nstill ok\n\xe2\x82")
    with pytest.raises(DatasetError, match=rf"{src}:3: invalid UTF-8"):
        prepare_dataset(src, tmp_path / "ds", chunk_bytes=4)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "unterminated', "invalid JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        ('{"body": "no text field"}', 'no "text" field'),
        ('{"text": 42}', '"text" must be a string'),
        ('{"text": null}', '"text" must be a string'),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    src = write(tmp_path / "bad.jsonl", '{"text": "good"}\n\n' + line + "\n" + '{"text": "never read"}\n')
    with pytest.raises(DatasetError, match=message) as exc:
        prepare_dataset(src, tmp_path / "ds")
    assert f"{src}:3:" in str(exc.value) and exc.value.line == 3


def test_invalid_utf8_in_jsonl(tmp_path):
    src = write(tmp_path / "bad.jsonl", b'{"text": "good"}\n{"text": "b\xffd"}\n')
    with pytest.raises(DatasetError, match=rf"{src}:2: invalid UTF-8"):
        prepare_dataset(src, tmp_path / "ds")


def test_missing_file(tmp_path):
    good = write(tmp_path / "a.txt", "text")
    with pytest.raises(DatasetError, match="nope.txt: no such file"):
        prepare_dataset([good, tmp_path / "nope.txt"], tmp_path / "ds")


@pytest.mark.parametrize(
    "name, content",
    [("empty.txt", ""), ("blank.jsonl", "\n\n  \n"), ("empty_texts.jsonl", '{"text": ""}\n{"text": ""}\n')],
)
def test_empty_corpus(tmp_path, name, content):
    src = write(tmp_path / name, content)
    with pytest.raises(DatasetError, match=f"empty corpus.*{name}"):
        prepare_dataset(src, tmp_path / "ds")
    assert not (tmp_path / "ds" / "meta.json").exists()


def test_bad_arguments(tmp_path):
    src = write(tmp_path / "a.txt", "x")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset(src, tmp_path / "ds", val_fraction=1.0)
    with pytest.raises(ValueError, match="format"):
        prepare_dataset(src, tmp_path / "ds", format="csv")


# --------------------------------------------------------------------------------------------------
# Batch loader
# --------------------------------------------------------------------------------------------------


def test_loader_batches_are_windows_with_next_token_targets():
    data = np.arange(1000, dtype=np.uint16)
    loader = BatchLoader(data, block_size=16, batch_size=4, seed=3)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # arange data: the next token is always +1
    assert int(x.max()) < 1000 and int(y.max()) <= 999


def test_loader_is_reproducible_from_seed_and_restores_position(tmp_path):
    data = np.random.default_rng(0).integers(0, 50000, 5000).astype(np.uint16)
    a = BatchLoader(data, 32, 8, seed=11)
    b = BatchLoader(torch.from_numpy(data.astype(np.int64)), 32, 8, seed=11)
    first = [a.next_batch() for _ in range(3)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, (b.next_batch() for _ in range(3))))
    assert not torch.equal(BatchLoader(data, 32, 8, seed=12).next_batch()[0], first[0][0])

    state = a.state_dict()
    assert state["position"] == 3
    after = [a.next_batch() for _ in range(4)]
    path = tmp_path / "tokens.bin"
    data.tofile(path)
    c = BatchLoader(path, 32, 8, seed=11)  # a fresh loader over the same tokens, from a file
    c.load_state_dict(state)
    again = [c.next_batch() for _ in range(4)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(after, again))
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(data, 32, 8, seed=99).load_state_dict(state)


def test_loader_rejects_too_short_data():
    with pytest.raises(DatasetError, match="needs at least 17"):
        BatchLoader(np.arange(16, dtype=np.uint16), block_size=16, batch_size=2)
    BatchLoader(np.arange(17, dtype=np.uint16), block_size=16, batch_size=2).next_batch()  # just enough


# --------------------------------------------------------------------------------------------------
# Prompt/completion records and loss masks
# --------------------------------------------------------------------------------------------------


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


PC_RECORDS = [
    {"prompt": "Question: what is two plus two?\nAnswer:", "completion": " four", "id": 1},  # extra field ignored
    {"text": "A plain document, trained on whole."},
    {"prompt": "The cat", "completion": "s are here"},  # tokenized apart: not the tokens of "The cats are here"
    {"prompt": "Say nothing:", "completion": ""},  # only the EOT is a target
    {"prompt": "", "completion": ""},  # no document, as an empty text is not
    {"prompt": "", "completion": "No prompt at all."},
]


def pc_expected(tokenizer, records) -> tuple[list[int], list[int]]:
    """The tokens and mask a prompt/completion file must give, built from the rule directly."""
    tokens, mask = [], []
    for r in records:
        prompt, completion = ("", r["text"]) if "text" in r else (r["prompt"], r["completion"])
        if not prompt and not completion:
            continue
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
        tokens += p + c + [EOT]
        mask += [0] * len(p) + [1] * (len(c) + 1)
    return tokens, mask


def test_prompt_completion_records_write_aligned_masks(tmp_path, tokenizer):
    src = jsonl(tmp_path / "pc.jsonl", PC_RECORDS)
    tokens, mask = pc_expected(tokenizer, PC_RECORDS)
    assert tokenizer.encode("The cat") + tokenizer.encode("s are here") != tokenizer.encode("The cats are here")
    info = prepare_dataset(src, tmp_path / "ds", val_fraction=0.0, tokenizer=tokenizer)
    out = tmp_path / "ds"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "train.mask.bin", "val.bin", "val.mask.bin"]
    assert read_tokens(out / "train.bin") == tokens
    assert (out / "train.mask.bin").read_bytes() == bytes(mask)  # uint8 per token, 1 = target
    assert (out / "val.mask.bin").stat().st_size == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["files"] == {"train": "train.bin", "val": "val.bin", "train_mask": "train.mask.bin",
                             "val_mask": "val.mask.bin"}
    assert meta["targets"] == {"train": sum(mask), "val": 0} and meta["mask"]["dtype"] == "uint8"
    assert meta["sources"][0]["documents"] == 5 and info.masked
    ds = load_dataset(out)
    assert ds.train.tolist() == tokens and ds.train_mask.tolist() == mask
    assert ds.train_mask.dtype == np.uint8 and ds.val_mask.size == 0


@pytest.mark.parametrize("val_fraction", [0.1, 0.37, 0.5])
def test_masks_are_split_with_the_tokens(tmp_path, tokenizer, val_fraction):
    """The split is by token offset, per source, wherever it falls (inside a prompt too); masks follow it, and a
    source without prompts gets mask 1s, before or after a masked source."""
    text = write(tmp_path / "a.txt", "Some plain text before the pairs.\n")
    pairs = [{"prompt": f"Prompt number {i} is here:", "completion": f" answer {i}"} for i in range(7)]
    pc = jsonl(tmp_path / "b.jsonl", pairs)
    after = jsonl(tmp_path / "c.jsonl", [{"text": "and text after"}])
    prepare_dataset([text, pc, after], tmp_path / "ds", val_fraction=val_fraction, tokenizer=tokenizer, chunk_bytes=8)
    ds = load_dataset(tmp_path / "ds")
    parts = [(tokenizer.encode(text.read_text()) + [EOT], None), pc_expected(tokenizer, pairs),
             pc_expected(tokenizer, [{"text": "and text after"}])]
    train, train_mask, val, val_mask = [], [], [], []
    for tokens, mask in parts:
        mask = [1] * len(tokens) if mask is None else mask
        cut = len(tokens) - math.ceil(len(tokens) * val_fraction)
        train, train_mask = train + tokens[:cut], train_mask + mask[:cut]
        val, val_mask = val + tokens[cut:], val_mask + mask[cut:]
    assert ds.train.tolist() == train and ds.train_mask.tolist() == train_mask
    assert ds.val.tolist() == val and ds.val_mask.tolist() == val_mask
    assert ds.meta["targets"] == {"train": sum(train_mask), "val": sum(val_mask)}


def test_text_datasets_have_no_mask_and_replace_an_earlier_masked_one(tmp_path, tokenizer):
    out = tmp_path / "ds"
    prepare_dataset(jsonl(tmp_path / "pc.jsonl", PC_RECORDS), out, val_fraction=0.2)
    assert load_dataset(out).train_mask is not None
    # Lines with empty prompts only: no token is masked, so it is written as plain text is.
    prepare_dataset(jsonl(tmp_path / "np.jsonl", [{"prompt": "", "completion": "x y"}, {"text": "z"}]), out,
                    val_fraction=0.2)
    ds = load_dataset(out)
    assert ds.train_mask is None and ds.val_mask is None
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no stale masks
    assert "train_mask" not in ds.meta["files"] and "targets" not in ds.meta and "mask" not in ds.meta


def test_load_dataset_rejects_a_mask_of_the_wrong_length(tmp_path):
    out = tmp_path / "ds"
    prepare_dataset(jsonl(tmp_path / "pc.jsonl", PC_RECORDS), out, val_fraction=0.2)
    whole = (out / "train.mask.bin").read_bytes()
    (out / "train.mask.bin").write_bytes(whole[:-1])
    with pytest.raises(DatasetError, match="train.mask.bin: has .* entries but the train split has"):
        load_dataset(out)
    (out / "train.mask.bin").write_bytes(whole)
    (out / "val.mask.bin").unlink()
    with pytest.raises(DatasetError, match="no such mask file"):
        load_dataset(out)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x"}', 'has "prompt" but no "completion"'),
        ('{"completion": "x", "source": "web"}', 'has "completion" but no "prompt"'),
        ('{"prompt": 1, "completion": "x"}', '"prompt" must be a string, got int'),
        ('{"prompt": "x", "completion": null}', '"completion" must be a string, got NoneType'),
        ('{"prompt": "x", "completion": "\\udc00"}', '"completion" has an unpaired surrogate'),
        ('{"text": "a", "completion": "b"}', 'has both "text" and "completion"'),
        ('{"source": "web"}', 'no "text" field \\(nor "prompt" and "completion"\\)'),
    ],
)
def test_bad_prompt_completion_lines_name_file_and_line(tmp_path, line, message):
    src = write(tmp_path / "bad.jsonl", '{"prompt": "good", "completion": " line"}\n\n' + line + "\n")
    with pytest.raises(DatasetError, match=message) as exc:
        prepare_dataset(src, tmp_path / "ds")
    assert f"{src}:3:" in str(exc.value) and exc.value.line == 3


def test_loader_puts_ignore_index_exactly_at_masked_targets():
    """Tokens 0..N-1 (a token's value is its position) with a random mask: y is -100 exactly where the target
    token's mask is 0; the windows, inputs and loader state are those of the same loader without a mask."""
    n = 3000
    data = np.arange(n, dtype=np.uint16)
    mask = np.random.default_rng(1).integers(0, 2, n).astype(np.uint8)
    masked, plain = BatchLoader(data, 32, 8, seed=4, mask=mask), BatchLoader(data, 32, 8, seed=4)
    for _ in range(5):
        (x, y), (px, py) = masked.next_batch(), plain.next_batch()
        assert torch.equal(x, px)
        expected = torch.where(torch.from_numpy(mask[py.numpy()] == 0), torch.full_like(py, -100), py)
        assert torch.equal(y, expected) and (y == -100).any() and (y != -100).any()
    assert masked.state_dict() == plain.state_dict()
    again = BatchLoader(data, 32, 8, seed=4, mask=torch.from_numpy(mask.astype(bool)))  # a bool tensor works too
    again.load_state_dict({"position": 3, "seed": 4})
    assert torch.equal(again.next_batch()[1], BatchLoader(data, 32, 8, seed=4, mask=mask).batch(3)[1])
    with pytest.raises(ValueError, match="loss mask has 2999 entries, but there are 3000 tokens"):
        BatchLoader(data, 32, 8, mask=mask[:-1])


def test_loader_masks_a_prepared_prompt_completion_dataset(tmp_path, tokenizer):
    pairs = [{"prompt": f"Tell me fact {i} about the sea:", "completion": f" the sea has {i} waves"} for i in range(40)]
    prepare_dataset(jsonl(tmp_path / "pc.jsonl", pairs), tmp_path / "ds", val_fraction=0.0)
    ds = load_dataset(tmp_path / "ds")
    loader = BatchLoader(ds.train, 16, 4, seed=0, mask=ds.train_mask)
    plain = BatchLoader(ds.train, 16, 4, seed=0)
    completion_ids = {t for i in range(40) for t in tokenizer.encode(f" the sea has {i} waves")} | {EOT}
    for _ in range(3):
        (_, y), (_, py) = loader.next_batch(), plain.next_batch()
        kept = y != -100
        assert torch.equal(y[kept], py[kept]) and set(y[kept].tolist()) <= completion_ids
        assert not kept.all()
