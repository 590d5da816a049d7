"""Issue 8 in the workers: accepted work runs. Same seed, same run; any token a model writes comes back exactly;
one bad prompt fails only itself; errors name the user's things, never the server's. SQLite and PostgreSQL."""
from __future__ import annotations

import io
import json
import logging
import secrets

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from sqlalchemy import select

from api import create_app
from gpt2core import GPT2, CheckpointError, GPT2Config, GPT2Tokenizer, SamplingParams, generate
from gpt2core.checkpoint import check_checkpoint
from jobs import repository, uploads
from jobs.db import session_scope
from jobs.models import GenerationResult, JobEvent
from jobs.readers import FileRejected, read_generation_file
from jobs.specs import GenerateSpec, Sampling, TrainSpec, resolve, stored_params
from workers import generation
from workers.generation import item_seed, run_generation
from workers.runtime import error_for
from workers.training import run_training

from ..jobs.test_readers import generation_lines
from .test_worker_runs import CORPUS, HYPER, TINY, events, job, upload


def submit(rt, owner: str, spec, **refs) -> str:
    spec = resolve(spec)
    with session_scope(rt.sessions) as session:
        return repository.create_job(session, owner, spec.type, stored_params(spec), **refs)[0].id


def register(rt, owner: str, model: GPT2, name: str = "m") -> str:
    folder = rt.artifacts.root / "imported" / name
    model.save_pretrained(folder)
    info = check_checkpoint(folder)
    with session_scope(rt.sessions) as session:
        return repository.create_model(session, owner, name, "import", str(folder), info.config,
                                       info.parameter_count).id


def step_losses(rt, job_id: str) -> list[float]:
    return [e.data["loss"] for e in events(rt, job_id) if e.type == "metrics" and "loss" in (e.data or {})]


def test_same_seed_same_run(rt, owner):
    """Input 5 of issue 8: two identical train jobs with seed 42 differed from step 1 (weights were drawn before
    the seed was applied). Now the seed fixes the initial weights, the data order and dropout."""
    file_id = upload(rt, owner, CORPUS)
    spec = TrainSpec(type="train", training_file=file_id, model=TINY, seed=42, hyperparameters=HYPER)
    runs = []
    for seed in (42, 42, 43):
        job_id = submit(rt, owner, spec.model_copy(update={"seed": seed}), training_file_id=file_id)
        run_training(rt, job_id)
        assert job(rt, job_id).status == "succeeded", job(rt, job_id).error
        runs.append(step_losses(rt, job_id))
    assert len(runs[0]) == HYPER["max_steps"]
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


def test_training_warns_about_settings_it_cannot_honour(rt, owner):
    """eval_every with a validation split too small to evaluate is a warning event, not a quiet no-op."""
    file_id = upload(rt, owner, CORPUS[:1500])
    spec = TrainSpec(type="train", training_file=file_id, model=TINY, seed=1, hyperparameters=HYPER)
    job_id = submit(rt, owner, spec, training_file_id=file_id)
    run_training(rt, job_id)
    warnings = [e.message for e in events(rt, job_id) if e.level == "warning"]
    assert job(rt, job_id).status == "succeeded"
    assert len(warnings) == 1 and warnings[0].startswith("hyperparameters.eval_every 3: no evaluation will run")


def byte_model() -> tuple[GPT2, list[int]]:
    """A model that writes single-byte tokens only: the control characters (NUL first), DEL, and bytes that are
    not UTF-8 on their own. ln_f's output is a constant vector that scores exactly those tokens high, NUL and ESC
    about 6 times higher than the others, so that every run writes them (whatever the seeds draw)."""
    tok = GPT2Tokenizer()
    byte_values = [*range(32), 127, *range(0x80, 0x100)][:112]
    ids = [tok.encoding.encode_single_token(bytes([b])) for b in byte_values]
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=len(ids), block_size=64))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        for column, token in enumerate(ids):
            model.transformer.wte.weight[token, column] = 1.15 if byte_values[column] in (0x00, 0x1B) else 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(12.0)
    return model.eval(), ids


def test_any_bytes_a_model_writes_round_trip(rt, owner):
    """NUL, escape sequences and bytes that are not UTF-8: the job succeeds and results.jsonl holds exactly the
    completions the model wrote (the same as gpt2core.generate with the same seeds)."""
    model, byte_ids = byte_model()
    model_id = register(rt, owner, model, "bytes")
    prompts = [f"prompt {i}" for i in range(12)] + ["\x00\ue000", ""]
    spec = GenerateSpec(type="generate", model=model_id, prompts=prompts,
                        sampling=Sampling(max_new_tokens=40, seed=7))
    job_id = submit(rt, owner, spec, base_model_id=model_id)
    run_generation(rt, job_id)
    assert job(rt, job_id).status == "succeeded", job(rt, job_id).error

    tok = GPT2Tokenizer()
    loaded = GPT2.from_pretrained(rt.artifacts.root / "imported" / "bytes").eval()
    expected = generate(loaded, tok, prompts, [SamplingParams(max_new_tokens=40, seed=item_seed(7, i))
                                              for i in range(len(prompts))])
    with session_scope(rt.sessions) as session:
        _, secret = repository.create_api_key(session, owner)
    app = create_app(rt.settings)
    try:
        response = app.test_client().get(f"/v1/jobs/{job_id}/results.jsonl",
                                          headers={"Authorization": f"Bearer {secret}"})
    finally:
        app.extensions["gpt2jobs"].engine.dispose()
    lines = [json.loads(line) for line in response.data.decode("utf-8").splitlines(keepends=False) if line]
    # splitlines() would split inside completions at U+2028 or \x1c; JSON escapes them, so the lines are whole.
    assert [line["prompt"] for line in lines] == prompts
    written = "".join(c["text"] for line in lines for c in line["completions"])
    assert "\x00" in written and "\x1b" in written and "\ufffd" in written
    for line, want in zip(lines, expected):
        assert line["error"] is None
        assert [c["text"] for c in line["completions"]] == [c.text for c in want.completions]
        assert [c["token_ids"] for c in line["completions"]] == [c.token_ids for c in want.completions]
        assert all(t in byte_ids for c in line["completions"] for t in c["token_ids"])


def test_model_with_a_bigger_vocabulary_generates(rt, owner):
    """Input 4 of issue 8: a checkpoint resized to 50,258 tokens (a pad token added) imported, then every prompt
    failed on decoding id 50257. Ids the tokenizer cannot decode are never sampled."""
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50258))
    with torch.no_grad():
        model.transformer.wte.weight[50257].fill_(5.0)  # the added row: greedy's favourite, were it allowed
    model_id = register(rt, owner, model, "padded")
    for temperature in (0.0, 1.0):
        spec = GenerateSpec(type="generate", model=model_id, prompts=["Hello", "world"],
                            sampling=Sampling(max_new_tokens=6, temperature=temperature))
        job_id = submit(rt, owner, spec, base_model_id=model_id)
        run_generation(rt, job_id)
        assert job(rt, job_id).status == "succeeded"
        with session_scope(rt.sessions) as session:
            results = list(session.scalars(select(GenerationResult).where(GenerationResult.job_id == job_id)))
        assert [r.error for r in results] == [None, None]
        assert all(t < 50257 for r in results for c in r.completions for t in c["token_ids"])


def test_one_failing_prompt_fails_only_itself(rt, owner, monkeypatch, caplog, tiny_model):
    """Whatever one prompt raises becomes its error line, with a reference the worker's log shows; the others
    complete. (The failure is injected into generation for one prompt.)"""
    real = generation.generate
    boom = GPT2Tokenizer().encode("boom")  # the worker hands generate() each prompt's token ids

    def fails_on_boom(model, tok, prompts, params):
        if boom in [list(prompt) for prompt in prompts]:
            raise RuntimeError("decoder exploded at /srv/secret/path")
        return real(model, tok, prompts, params)

    monkeypatch.setattr(generation, "generate", fails_on_boom)
    model_id = register(rt, owner, tiny_model, "tiny")
    spec = GenerateSpec(type="generate", model=model_id, prompts=["fine", "boom", "also fine"],
                        sampling=Sampling(max_new_tokens=3))
    job_id = submit(rt, owner, spec, base_model_id=model_id)
    with caplog.at_level(logging.ERROR, logger="workers.generation"):
        run_generation(rt, job_id)
    done = job(rt, job_id)
    assert done.status == "succeeded" and done.progress["completed"] == 2 and done.progress["failed"] == 1
    with session_scope(rt.sessions) as session:
        results = list(session.scalars(select(GenerationResult).where(GenerationResult.job_id == job_id)
                                       .order_by(GenerationResult.index)))
    assert [r.error is None for r in results] == [True, False, True]
    error = results[1].error
    assert error["code"] == "generation_failed" and "/srv" not in error["message"]
    reference = error["message"].split("reference ")[1].rstrip(").")
    assert any(reference in record.getMessage() and record.exc_info for record in caplog.records)


def test_shard_failing_for_infrastructure_is_retried(rt, owner, monkeypatch, tiny_model):
    real, calls = generation.generate_items, []

    def flaky(model, job_id, items, *args):
        calls.append(len(items))
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return real(model, job_id, items, *args)

    monkeypatch.setattr(generation, "generate_items", flaky)
    model_id = register(rt, owner, tiny_model, "tiny")
    spec = GenerateSpec(type="generate", model=model_id, prompts=["a", "b"], sampling=Sampling(max_new_tokens=2))
    job_id = submit(rt, owner, spec, base_model_id=model_id)
    run_generation(rt, job_id)
    assert job(rt, job_id).status == "succeeded" and calls == [2, 2]
    assert any("Shard 0 failed unexpectedly; retrying" in e.message for e in events(rt, job_id))


def test_errors_name_the_users_things_not_the_servers(rt, owner):
    """A training file that breaks the rules (written behind the upload check) fails its job naming the file as
    the user uploaded it, never the server's path."""
    file_id = upload(rt, owner, b"fine text\n" * 50 + b"caf\xc3(\n", name="my corpus.txt")
    spec = TrainSpec(type="train", training_file=file_id, model=TINY, seed=1, hyperparameters=HYPER)
    job_id = submit(rt, owner, spec, training_file_id=file_id)
    run_training(rt, job_id)
    error = job(rt, job_id).error
    assert error["code"] == "invalid_file" and error["message"].startswith("my corpus.txt: line 51: invalid UTF-8")
    assert str(rt.artifacts.root) not in json.dumps(error)
    with session_scope(rt.sessions) as session:
        messages = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
    assert not any(str(rt.artifacts.root) in message for message in messages)


@pytest.mark.parametrize("exc", [
    KeyError("Invalid token for decoding: 50257"),
    RuntimeError('(psycopg.errors.StringDataRightTruncation) value too long [SQL: INSERT INTO generation_results '
                 '(prompt) VALUES (%(prompt)s)] [parameters: {"prompt": "another user\'s text"}]'),
])
def test_internal_errors_show_a_reference_only(exc, caplog):
    with caplog.at_level(logging.ERROR, logger="workers"):
        error = error_for(exc, "job-x")
    assert error["code"] == "internal_error" and "SQL" not in error["message"] and "50257" not in error["message"]
    assert error["reference"] in error["message"]
    assert any(error["reference"] in r.getMessage() and r.exc_info for r in caplog.records)


def run_file(rt, owner: str, model_id: str, content: bytes) -> tuple[str, list[GenerationResult]]:
    """Upload `content` through the upload check, then run a generate job on it in this process."""
    file = uploads.upload_file(rt.sessions, rt.artifacts, owner, "generate", "in.jsonl", io.BytesIO(content),
                               1 << 20)
    spec = GenerateSpec(type="generate", model=model_id, input_file=file.id, sampling=Sampling(max_new_tokens=2))
    job_id = submit(rt, owner, spec, base_model_id=model_id, input_file_id=file.id)
    run_generation(rt, job_id)
    with session_scope(rt.sessions) as session:
        results = list(session.scalars(select(GenerationResult).where(GenerationResult.job_id == job_id)
                                       .order_by(GenerationResult.index)))
    return job_id, results


def test_carriage_returns_and_bom_in_a_generation_file(rt, owner, tiny_model):
    """Input 1 of issue 8: a raw CR between JSON tokens uploaded with 201, then the job failed whole
    (JSONDecodeError): the worker's text-mode file split lines at CR too. Both now read the same lines."""
    model_id = register(rt, owner, tiny_model, "tiny")
    content = (b'\xef\xbb\xbf{"custom_id": "q1",\r "prompt": "Hello"}\r\n\r\n'
               b'{"custom_id": "q2", "prompt": "a\\rb\\u0000c"}\n{"custom_id": "q3",\r"prompt": "Bye"}')
    job_id, results = run_file(rt, owner, model_id, content)
    assert job(rt, job_id).status == "succeeded", job(rt, job_id).error
    assert [(r.custom_id, r.prompt, r.error) for r in results] == [
        ("q1", "Hello", None), ("q2", "a\rb\x00c", None), ("q3", "Bye", None)]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=generation_lines())
def test_property_an_accepted_generation_file_never_fails_its_job(rt, owner, tiny_model, content):
    """Hostile generation files: refused at upload, or their job succeeds with one result per line, each prompt and
    custom_id stored and read back exactly (on PostgreSQL as on SQLite)."""
    try:
        expected = list(read_generation_file(io.BytesIO(content), "in.jsonl"))
    except FileRejected:
        with pytest.raises(FileRejected):
            uploads.upload_file(rt.sessions, rt.artifacts, owner, "generate", "in.jsonl", io.BytesIO(content), 1 << 20)
        return
    model_id = register(rt, owner, tiny_model, f"tiny-{secrets.token_hex(4)}")
    job_id, results = run_file(rt, owner, model_id, content)
    assert job(rt, job_id).status == "succeeded", job(rt, job_id).error
    assert [(r.custom_id, r.prompt) for r in results] == [(i.custom_id, i.prompt) for i in expected]


def test_settings_a_file_line_cannot_honour_are_warned_about(rt, owner, tiny_model):
    model_id = register(rt, owner, tiny_model, "tiny")
    content = (b'{"custom_id": "a", "prompt": "x", "sampling": {"temperature": 0, "top_k": 5}}\n'
               b'{"custom_id": "b", "prompt": "y"}\n'
               b'{"custom_id": "c", "prompt": "z", "sampling": {"temperature": 0, "top_k": 9, "n": 2}}\n')
    job_id, results = run_file(rt, owner, model_id, content)
    assert job(rt, job_id).status == "succeeded"
    assert [e.message for e in events(rt, job_id) if e.level == "warning"] == [
        "temperature 0 is greedy decoding: top_k 5 has no effect (in 1 line of the input file; first: custom_id 'a')",
        "temperature 0 is greedy decoding: top_k 9 has no effect (in 1 line of the input file; first: custom_id 'c')",
        "temperature 0 is greedy decoding: the n 2 completions of a prompt are identical (in 1 line of the input "
        "file; first: custom_id 'c')"]


def test_tiny_top_p_keeps_the_most_likely_token(rt, owner, tiny_model):
    """top_p below float32's smallest value read as 0 and kept no token at all: every prompt failed."""
    model_id = register(rt, owner, tiny_model, "tiny")
    spec = GenerateSpec(type="generate", model=model_id, prompts=["a", "b"],
                        sampling=Sampling(max_new_tokens=3, top_p=1e-320))
    job_id = submit(rt, owner, spec, base_model_id=model_id)
    run_generation(rt, job_id)
    with session_scope(rt.sessions) as session:
        results = list(session.scalars(select(GenerationResult).where(GenerationResult.job_id == job_id)))
    assert [r.error for r in results] == [None, None] and all(r.completions[0]["tokens"] == 3 for r in results)


def test_non_finite_model_cannot_be_registered_nor_trained(rt, tiny_model):
    """A checkpoint with a NaN weight is refused by the one check (import and from_pretrained alike); a run whose
    loss becomes NaN ends 'training_diverged', the user's to act on, not internal_error."""
    with torch.no_grad():
        tiny_model.transformer.h[0].attn.c_attn.weight[0, 0] = float("nan")
    tiny_model.save_pretrained(rt.artifacts.root / "nan")
    with pytest.raises(CheckpointError, match="h.0.attn.c_attn.weight holds NaN"):
        check_checkpoint(rt.artifacts.root / "nan")
    error = error_for(FloatingPointError("training loss is nan at step 12"), "job-x")
    assert error["code"] == "training_diverged" and error["param"] == "hyperparameters.learning_rate"
    assert error["message"].startswith("Training diverged: training loss is nan at step 12.")
