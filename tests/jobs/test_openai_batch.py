"""The OpenAI batch input reader (jobs.openai_batch): what each request maps to, every problem reported with its
line and param, and the upload check being the very same read."""
from __future__ import annotations

import io
import json

import pytest

from jobs import openai_batch
from jobs.openai_batch import MAX_PROBLEMS, check_batch_file, iter_batch_requests, read_batch_file
from jobs.readers import FileRejected
from jobs.specs import Sampling

MODEL = "model-0123456789abcdef01234567"


def line(custom_id: str = "r1", body: dict | None = None, **fields) -> dict:
    request = {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
               "body": {"model": MODEL, "prompt": "Hello", **(body or {})}}
    request.update(fields)
    return request


def jsonl(*lines) -> bytes:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines).encode()


def read(*lines):
    return read_batch_file(io.BytesIO(jsonl(*lines)), "batch.jsonl")


def problems(*lines) -> list[tuple[int | None, str | None, str]]:
    return [(p.line, p.param, p.code) for p in read(*lines).problems]


def test_every_supported_parameter_maps_to_sampling():
    body = {"max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "n": 3, "stop": ["\n", "END"], "seed": 42,
            "top_k": 40, "repetition_penalty": 1.2}
    (request,) = read(line(body=body)).requests
    assert (request.index, request.line, request.custom_id, request.model, request.prompt) == (
        0, 1, "r1", MODEL, "Hello")
    assert request.sampling == Sampling(max_new_tokens=32, temperature=0.7, top_p=0.9, n=3, stop=["\n", "END"], seed=42,
                                        top_k=40, repetition_penalty=1.2)
    assert request.sampling.model_fields_set == {"max_new_tokens", "temperature", "top_p", "n", "stop", "seed",
                                                 "top_k", "repetition_penalty"}


def test_defaults_are_openai_s_and_only_given_values_override_the_job():
    (request,) = read(line(body={"max_tokens": None, "temperature": None, "stop": "\n\n", "n": 2.0})).requests
    assert request.sampling.max_new_tokens == 16  # OpenAI's completions default, absent or null
    assert request.sampling.model_fields_set == {"max_new_tokens", "stop", "n"}
    assert request.sampling.stop == ["\n\n"] and request.sampling.n == 2  # a string stop; 2.0 is an integer
    job = Sampling(max_new_tokens=64, temperature=0.5, seed=7)
    assert job.merged(request.sampling).temperature == 0.5 and job.merged(request.sampling).max_new_tokens == 16


def test_no_op_parameters_are_accepted_with_their_no_op_values():
    body = {"echo": False, "logprobs": None, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0.0,
            "stream": False, "user": "user-123", "suffix": None, "logit_bias": {}, "stream_options": None}
    assert problems(line(body=body)) == []


@pytest.mark.parametrize("param, value", [
    ("echo", True), ("logprobs", 2), ("logprobs", 0), ("best_of", 3), ("frequency_penalty", 0.5),
    ("presence_penalty", -1), ("stream", True), ("suffix", "!"), ("logit_bias", {"50256": -100}),
    ("frequency_penalty", False), ("echo", 0), ("stream_options", {"include_usage": True}), ("user", 5),
    ("max_tokens", 0), ("max_tokens", 2000), ("max_tokens", "16"), ("temperature", 2.5), ("temperature", -0.1),
    ("top_p", 0), ("top_p", 1.5), ("n", 17), ("n", True), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]),
    ("stop", 5), ("seed", -1), ("seed", 1.5), ("top_k", -1), ("repetition_penalty", 0), ("functions", []),
    ("temperature", float("inf")),
])
def test_each_unsupported_or_invalid_parameter_is_reported_with_its_line_and_param(param, value):
    bad = line("bad", body={param: value})
    found = problems(line("ok"), bad)
    assert len(found) == 1 and found[0][:2] == (2, f"body.{param}"), found
    assert found[0][2] in ("unsupported_parameter", "invalid_value")


def test_several_bad_lines_are_all_reported():
    lines = [
        line("a"),
        line("b", method="GET"),
        line("c", url="/v1/chat/completions"),
        line("d", body={"echo": True, "temperature": 9}),
        line("e", body={"prompt": [1, 2, 3]}),
        line("f", body={"prompt": ["one", "two"]}),
        {"custom_id": "g", "method": "POST", "url": "/v1/completions"},
        line("h", extra="field"),
        line("i", body={"prompt": None}),
    ]
    assert problems(*lines) == [
        (2, "method", "invalid_method"),
        (3, "url", "invalid_url"),
        (4, "body.echo", "unsupported_parameter"),
        (4, "body.temperature", "invalid_value"),
        (5, "body.prompt", "unsupported_parameter"),
        (6, "body.prompt", "unsupported_parameter"),
        (7, "body", "missing_required_parameter"),
        (8, "extra", "unsupported_parameter"),
        (9, "body.prompt", "missing_required_parameter"),
    ]
    messages = {p.line: p.message for p in read(*lines).problems}
    assert "token ids" in messages[5] and "one request line per prompt" in messages[6]
    assert read(*lines).errors()[0] == {"code": "invalid_method", "message": 'method must be "POST", got "GET"',
                                        "param": "method", "line": 2}


def test_a_batch_names_one_model():
    other = "model-ffffffffffffffffffffffff"
    batch = read(line("a"), line("b", body={"model": other}), line("c"), line("d", body={"model": None}))
    assert batch.model == MODEL
    assert [(p.line, p.param, p.code) for p in batch.problems] == [
        (2, "body.model", "mismatched_model"), (4, "body.model", "missing_required_parameter")]
    assert "line 1 names" in batch.problems[0].message
    assert problems(line(body={"model": "bad\x00name"}))[0][1:] == ("body.model", "invalid_value")


def test_problems_past_the_cap_are_counted_in_one_last_entry():
    batch = read(*[line(f"r{i}", method="PUT") for i in range(MAX_PROBLEMS + 7)])
    errors = batch.errors()
    assert len(errors) == MAX_PROBLEMS + 1 and errors[-1]["code"] == "too_many_errors"
    assert errors[-1]["message"].startswith("7 more problems not listed")


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}\n", "line 1: invalid UTF-8"),
    (jsonl(line("a"), "[1, 2]"), "line 2: expected a JSON object"),
    (jsonl(line("a"), "{not json"), "line 2: invalid JSON"),
    (b'{"custom_id": "a", "custom_id": "b"}\n', "line 1: key 'custom_id' appears twice"),
    (jsonl(line("a"), line("b"), line("a")), "line 3: repeats custom_id 'a' from line 1"),
    (jsonl({"method": "POST"}), "line 1: needs a string 'custom_id'"),
    (jsonl(line(5)), "line 1: needs a string 'custom_id'"),
    (jsonl(line("x" * 256)), "line 1: custom_id must be at most 255 characters"),
    (jsonl(line("tab\there")), "line 1: custom_id must not contain control characters"),
    (b"\n  \n", "batch.jsonl: the file holds no requests"),
])
def test_unreadable_files_are_refused_naming_the_first_bad_line(content, message):
    with pytest.raises(FileRejected) as refused:
        read_batch_file(io.BytesIO(content), "batch.jsonl")
    assert message in refused.value.message
    with pytest.raises(FileRejected) as again:  # the upload check is this very read
        check_batch_file(io.BytesIO(content), "batch.jsonl")
    assert again.value.message == refused.value.message


def test_the_upload_check_accepts_requests_with_problems_and_counts_them():
    content = jsonl(line("a"), line("b", method="GET"), "", line("c", body={"echo": True}))
    assert check_batch_file(io.BytesIO(content), "batch.jsonl") == 3
    with pytest.raises(FileRejected) as refused:  # what a worker reads must have none
        list(iter_batch_requests(io.BytesIO(content), "batch.jsonl"))
    assert refused.value.line == 2 and "(and 1 more problems)" in refused.value.message


def test_unicode_and_nul_prompts_survive():
    prompts = ["a\x00b", "😀 naïve", "\ue000\ue0000", "line\u2028sep\r\nCRLF", ""]
    content = jsonl(*[line(f"p{i}", body={"prompt": p}) for i, p in enumerate(prompts)])
    assert [r.prompt for r in read_batch_file(io.BytesIO(content), "b.jsonl").requests] == prompts
    surrogate = b'{"custom_id": "s", "method": "POST", "url": "/v1/completions", ' \
                b'"body": {"model": "' + MODEL.encode() + b'", "prompt": "\\ud800"}}\n'
    assert [(p.param, p.code) for p in read_batch_file(io.BytesIO(surrogate), "b.jsonl").problems] == [
        ("body.prompt", "invalid_value")]


def test_the_upload_check_is_the_reader(tmp_path):
    """jobs.uploads reads a batch file with check_batch_file, which is read_batch_file: one function."""
    import inspect

    from jobs import uploads

    assert uploads.check_batch_file is openai_batch.check_batch_file
    assert "read_batch_file(stream, filename)" in inspect.getsource(openai_batch.check_batch_file)
