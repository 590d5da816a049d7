import io

import pytest

from api.errors import ApiError
from api.uploads import check_generation_file, check_training_file


def check(fn, content: bytes, filename: str):
    return fn(io.BytesIO(content), filename)


def test_plain_text_training_file_is_one_document():
    assert check(check_training_file, "Some text\nmore\n".encode(), "corpus.txt") == 1


def test_jsonl_training_file_counts_documents():
    content = b'{"text": "a"}\n\n{"text": "b", "source": "x"}\n'
    assert check(check_training_file, content, "data.jsonl") == 2


@pytest.mark.parametrize(
    "content, filename, message",
    [
        (b"good line\nbad \xff byte\n", "c.txt", "c.txt: line 2 is not valid UTF-8"),
        (b'{"text": "a"}\nnot json\n', "d.jsonl", "d.jsonl: line 2 is not valid JSON"),
        (b'{"text": "a"}\n[1, 2]\n', "d.jsonl", "d.jsonl: line 2 is not a JSON object"),
        (b'{"text": "a"}\n{"text": 3}\n', "d.jsonl", "d.jsonl: line 2 needs a string field 'text'"),
        (b"  \n\n", "empty.txt", "empty.txt: the file holds no text"),
    ],
)
def test_bad_training_files_name_the_line(content, filename, message):
    with pytest.raises(ApiError) as error:
        check(check_training_file, content, filename)
    assert error.value.status == 400 and error.value.code == "invalid_file" and error.value.param == "file"
    assert error.value.message.startswith(message)


def test_utf8_error_line_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr("api.uploads.READ_BYTES", 7)
    content = "line one\nline two é\nthree\n".encode() + b"\xc3(\n"
    with pytest.raises(ApiError, match="line 4 is not valid UTF-8"):
        check(check_training_file, content, "x.txt")


def test_generation_file_counts_prompts():
    content = b'{"custom_id": "a", "prompt": "Hi"}\n{"custom_id": "b", "prompt": "", "sampling": {"top_k": 5}}\n'
    assert check(check_generation_file, content, "in.jsonl") == 2


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"custom_id": "a", "prompt": "again"}', "line 2 repeats custom_id 'a' from line 1"),
        (b'{"prompt": "x"}', "line 2 needs a non-empty string 'custom_id'"),
        (b'{"custom_id": "b"}', "line 2 needs a string 'prompt'"),
        (b'{"custom_id": "b", "prompt": "x", "temp": 1}', "line 2 has unknown field 'temp'"),
        (b'{"custom_id": "b", "prompt": "x", "sampling": {"top_p": 2}}', "line 2: sampling.top_p"),
    ],
)
def test_bad_generation_lines_are_named(line, message):
    content = b'{"custom_id": "a", "prompt": "first"}\n' + line + b"\n"
    with pytest.raises(ApiError, match=message):
        check(check_generation_file, content, "in.jsonl")
