"""The one reader per file format: what the upload check accepts is exactly what a job reads, line for line."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2core import load_dataset, prepare_dataset
from jobs.readers import (
    FileRejected,
    check_generation_file,
    check_training_file,
    count_training_tokens,
    read_generation_file,
)


def check(fn, content: bytes, filename: str):
    return fn(io.BytesIO(content), filename)


def items(content: bytes) -> list:
    return list(read_generation_file(io.BytesIO(content), "in.jsonl"))


def test_plain_text_training_file_is_one_document():
    assert check(check_training_file, "Some text\nmore\n".encode(), "corpus.txt") == 1


def test_jsonl_training_file_counts_documents():
    content = b'{"text": "a"}\n\n{"text": "b", "source": "x"}\n'
    assert check(check_training_file, content, "data.jsonl") == 2
    assert check(check_training_file, content, "data.ndjson") == 2


@pytest.mark.parametrize(
    "content, filename, message",
    [
        (b"good line\nbad \xff byte\n", "c.txt", "c.txt: line 2: invalid UTF-8"),
        (b'{"text": "a"}\nnot json\n', "d.jsonl", "d.jsonl: line 2: invalid JSON"),
        (b'{"text": "a"}\n[1, 2]\n', "d.jsonl", "d.jsonl: line 2: expected a JSON object"),
        (b'{"text": "a"}\n{"text": 3}\n', "d.jsonl", 'd.jsonl: line 2: "text" must be a string'),
        (b'{"text": "a"}\n{"text": "\\ud800"}\n', "d.jsonl", 'd.jsonl: line 2: "text" has an unpaired surrogate'),
        (b'{"text": "a\rb"}\n', "d.jsonl", "d.jsonl: line 1: invalid JSON: Invalid control character"),
        (b"\xef\xbb\xbf", "empty.txt", "empty.txt: the file holds no text"),
        (b'{"text": ""}\n', "empty.jsonl", "empty.jsonl: the file holds no text"),
    ],
)
def test_bad_training_files_name_the_line(content, filename, message):
    with pytest.raises(FileRejected) as error:
        check(check_training_file, content, filename)
    assert error.value.code == "invalid_file" and error.value.param == "file"
    assert error.value.message.startswith(message)


def test_utf8_error_line_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr("gpt2core.corpus.DEFAULT_READ_BYTES", 7)
    content = "line one\nline two é\nthree\n".encode() + b"\xc3(\n"
    with pytest.raises(FileRejected, match="line 4: invalid UTF-8"):
        check(check_training_file, content, "x.txt")


def test_generation_file_counts_prompts():
    content = b'{"custom_id": "a", "prompt": "Hi"}\n{"custom_id": "b", "prompt": "", "sampling": {"top_k": 5}}\n'
    assert check(check_generation_file, content, "in.jsonl") == 2


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"custom_id": "a", "prompt": "again"}', "line 2: repeats custom_id 'a' from line 1"),
        (b'{"prompt": "x"}', "line 2: needs a string 'custom_id'"),
        (b'{"custom_id": "", "prompt": "x"}', "line 2: custom_id must not be empty"),
        (b'{"custom_id": "b"}', "line 2: needs a string 'prompt'"),
        (b'{"custom_id": "b", "prompt": "x", "temp": 1}', "line 2: unknown field 'temp'"),
        (b'{"custom_id": "b", "prompt": "x", "sampling": {"top_p": 2}}', "line 2: sampling.top_p"),
        (b'{"custom_id": "b", "prompt": "x", "sampling": {"n": "2"}}', "line 2: sampling.n"),
        # Input 2 of issue 8: custom_id is a VARCHAR(255); on PostgreSQL a longer one failed the finished job.
        (b'{"custom_id": "' + b"c" * 300 + b'", "prompt": "x"}', "line 2: custom_id must be at most 255"),
        (b'{"custom_id": "a\\u0000b", "prompt": "x"}', "line 2: custom_id must not contain control"),
        (b'{"custom_id": "b", "prompt": "\\udc00"}', 'line 2: "prompt" has an unpaired surrogate'),
    ],
)
def test_bad_generation_lines_are_named(line, message):
    content = b'{"custom_id": "a", "prompt": "first"}\n' + line + b"\n"
    with pytest.raises(FileRejected, match=message):
        check(check_generation_file, content, "in.jsonl")


def test_carriage_return_between_json_tokens_is_whitespace():
    """Input 1 of issue 8: a raw CR between tokens is JSON whitespace, not a line break (the upload split lines on
    LF, the worker's text-mode file on CR too)."""
    content = b'{"custom_id": "q1",\r "prompt": "Hello"}\n{"custom_id": "q2", "prompt": "Bye"}\r\n'
    read = items(content)
    assert [(i.index, i.line, i.custom_id, i.prompt) for i in read] == [(0, 1, "q1", "Hello"), (1, 2, "q2", "Bye")]


def test_bom_crlf_and_blank_lines():
    """A UTF-8 BOM starts the file harmlessly; CRLF ends lines like LF; blank lines are skipped; a lone CR, U+2028
    and form feeds are content, not line breaks."""
    content = ('\ufeff{"custom_id": "a", "prompt": "x"}\r\n\r\n   \n'
               '{"custom_id": "b", "prompt": "line\\rsep\u2028ff\\f"}').encode()
    read = items(content)
    assert [(i.custom_id, i.prompt, i.line) for i in read] == [("a", "x", 1), ("b", "line\rsep\u2028ff\f", 4)]
    assert check(check_training_file, "\ufeffplain\r\ntext".encode(), "t.txt") == 1
    assert check(check_training_file, b'\xef\xbb\xbf{"text": "a"}\r\n', "t.jsonl") == 1


def test_nul_in_prompts_is_text():
    assert items(b'{"custom_id": "a", "prompt": "x\\u0000y"}')[0].prompt == "x\x00y"


def test_line_sampling_overrides_only_what_it_sets():
    (item,) = items(b'{"custom_id": "a", "prompt": "x", "sampling": {"top_k": 5}}')
    assert item.sampling.model_dump(exclude_unset=True) == {"top_k": 5}


# Hostile text: what the property tests below build files from.
HOSTILE = ["a", " ", "é", "😀", "\x00", "\r", "\n", "\r\n", "\ufeff", "\u2028", "\x85", "\x0c", "\ue000", "\t",
           '"', "\\", "{", "<|endoftext|>", "x" * 300]


def json_fragment(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


raw_bytes = st.binary(max_size=12)
hostile_text = st.lists(st.sampled_from(HOSTILE), max_size=8).map("".join)
pieces = st.one_of(
    hostile_text.map(lambda t: t.encode()),
    raw_bytes,
    st.sampled_from([b"\\ud800", b"\\udc00x", b"\\u0000", b"\\r\\n", b"\xff", b"\xc3", b"\xef\xbb\xbf"]),
)


@st.composite
def generation_lines(draw):
    """Lines that are mostly well-formed generation records, with hostile pieces in their ids and prompts, raw
    bytes, broken JSON, CR/CRLF/LF line endings, BOMs, blank lines."""
    out = []
    for number in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["good", "good", "good", "raw", "blank"]))
        if kind == "blank":
            out.append(draw(st.sampled_from([b"", b"  ", b"\r"])))
        elif kind == "raw":
            out.append(b"".join(draw(st.lists(pieces, max_size=4))))
        else:
            custom_id = draw(st.one_of(st.just(f"id-{number}"), hostile_text))
            prompt = draw(st.one_of(hostile_text, st.text(max_size=20)))
            body = '{"custom_id": "%s",%s"prompt": "%s"}' % (
                json_fragment(custom_id), draw(st.sampled_from([" ", "\r", "\t", ""])), json_fragment(prompt))
            try:
                encoded = body.encode("utf-8")
            except UnicodeEncodeError:
                encoded = body.encode("utf-8", "surrogatepass")
            out.append(encoded + b"".join(draw(st.lists(pieces, max_size=1))))
    endings = draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=len(out), max_size=len(out)))
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    return prefix + b"".join(line + end for line, end in zip(out, endings))


@settings(max_examples=150, deadline=None)
@given(content=generation_lines())
def test_property_generation_file_accepted_iff_every_line_reads(content):
    """Accepted at upload if and only if the worker's reading gives one item per non-blank line (none lost, none
    split), every prompt and custom_id being text a database can keep."""
    try:
        count = check(check_generation_file, content, "in.jsonl")
    except FileRejected:
        with pytest.raises(FileRejected):
            items(content)
        return
    read = items(content)
    assert len(read) == count
    lines = [line for line in content.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip(b" \t\r")]
    assert len(read) == len(lines)
    for item in read:
        assert item.prompt.encode("utf-8") is not None and 1 <= len(item.custom_id) <= 255


training_lines = st.lists(st.one_of(
    hostile_text.map(lambda t: json.dumps({"text": t}).encode()),
    st.tuples(hostile_text, hostile_text).map(lambda pc: json.dumps({"prompt": pc[0], "completion": pc[1]}).encode()),
    hostile_text.map(lambda t: json.dumps({"text": t}, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.lists(pieces, max_size=3).map(b"".join),
), min_size=1, max_size=5).map(lambda lines: b"\n".join(lines))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=training_lines, jsonl=st.booleans())
def test_property_training_file_accepted_iff_training_reads_it(tmp_path_factory, content, jsonl):
    """Accepted at upload if and only if gpt2core.prepare_dataset (what the training worker runs) tokenizes it."""
    folder = tmp_path_factory.mktemp("corpus")
    name = "train.jsonl" if jsonl else "train.txt"
    (folder / name).write_bytes(content)
    try:
        check(check_training_file, content, name)
        accepted = True
    except FileRejected:
        accepted = False
    try:
        prepare_dataset([folder / name], folder / "ds", val_fraction=0.0, format="jsonl" if jsonl else "text")
        tokens = int(load_dataset(folder / "ds").train.size)
    except ValueError:
        tokens = 0
    assert accepted == (tokens > 0)
    if accepted:  # the count the upload stores (and submission checks contexts against) is training's own
        assert count_training_tokens(io.BytesIO(content), name) == tokens


def test_readers_need_no_torch():
    """The API reads files with these readers and must run without torch."""
    import subprocess
    import sys

    code = "import sys, jobs.readers, jobs.model_import; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("content, filename, check_fn", [
    (b'{"custom_id": "a", "prompt": "x", "custom_id": "b"}\n', "in.jsonl", check_generation_file),
    (b'{"custom_id": "a", "prompt": "x", "sampling": {"n": 1, "n": 2}}\n', "in.jsonl", check_generation_file),
    (b'{"text": "a", "text": "b"}\n', "t.jsonl", check_training_file),
])
def test_duplicate_keys_are_refused(content, filename, check_fn):
    """Which of two equal keys wins is not defined by JSON: refused, naming the key, rather than guessed."""
    with pytest.raises(FileRejected, match="line 1: key '(custom_id|n|text)' appears twice"):
        check(check_fn, content, filename)


def test_prompt_completion_file_counts_records_and_tokens_as_training_does(tmp_path, tokenizer):
    """A prompt/completion file (mixed with text lines) counts as many records and tokens at upload as
    prepare_dataset makes of it: prompt and completion each tokenized alone, plus the end-of-text token; a record
    with both empty is no document, one with an empty completion is (its EOT is the target)."""
    records = [{"prompt": "Q: capital of France?\nA:", "completion": " Paris", "source": "quiz"},
               {"text": "a plain line"}, {"prompt": "The cat", "completion": "s are here"},
               {"prompt": "Nothing follows:", "completion": ""}, {"prompt": "", "completion": ""}]
    content = "".join(json.dumps(r) + "\n" for r in records).encode()
    tokens = sum(len(tokenizer.encode(r.get("prompt", ""))) + len(tokenizer.encode(r.get("completion", r.get("text", ""))))
                 + 1 for r in records if r.get("text") or r.get("prompt") or r.get("completion"))
    assert check(check_training_file, content, "pc.jsonl") == 4
    assert count_training_tokens(io.BytesIO(content), "pc.jsonl") == tokens
    (tmp_path / "pc.jsonl").write_bytes(content)
    info = prepare_dataset([tmp_path / "pc.jsonl"], tmp_path / "ds", val_fraction=0.0)
    assert info.total_tokens == tokens and info.sources[0].documents == 4


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"prompt": "x"}', 'd.jsonl: line 2: has "prompt" but no "completion"'),
        (b'{"completion": "x"}', 'd.jsonl: line 2: has "completion" but no "prompt"'),
        (b'{"prompt": ["x"], "completion": "y"}', 'd.jsonl: line 2: "prompt" must be a string, got list'),
        (b'{"prompt": "x", "completion": 7}', 'd.jsonl: line 2: "completion" must be a string, got int'),
        (b'{"prompt": "\\ud800", "completion": "y"}', 'd.jsonl: line 2: "prompt" has an unpaired surrogate'),
        (b'{"text": "t", "prompt": "x", "completion": "y"}', 'd.jsonl: line 2: has both "text" and "prompt"'),
        (b'{"id": 3}', 'd.jsonl: line 2: JSON object has no "text" field (nor "prompt" and "completion")'),
        (b'{"prompt": "x", "completion": "y", "prompt": "z"}', "d.jsonl: line 2: key 'prompt' appears twice"),
    ],
)
def test_bad_prompt_completion_lines_are_named(line, message):
    content = b'{"prompt": "first", "completion": " line"}\n' + line + b"\n"
    with pytest.raises(FileRejected) as error:
        check(check_training_file, content, "d.jsonl")
    assert error.value.line == 2 and error.value.message.startswith(message)
