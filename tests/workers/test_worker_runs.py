"""Worker task bodies run in-process against the real database (SQLite and PostgreSQL), artifact store and
filesystem broker: what a user sees in the job after each kind of run, and every failure path."""
from __future__ import annotations

import io
import secrets

import pytest
import torch
from pydoc_data.topics import topics

from gpt2core import GPT2, GPT2Config, CheckpointError, DatasetError
from jobs import execution, repository
from jobs.db import session_scope
from jobs.models import Checkpoint, Job, JobEvent, Model
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from workers.generation import ModelCache, run_generation
from workers.runtime import JobFailure, Runtime, error_for
from workers.training import run_training

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}
HYPER = {"max_steps": 6, "n_epochs": None, "batch_size": 2, "grad_accum_steps": 1, "learning_rate": 3e-3,
         "warmup_steps": 1, "weight_decay": 0.1, "eval_every": 3, "checkpoint_every": 3, "sample_every": 3}
CORPUS = "\n\n".join(topics.values())[:20_000].encode()


def upload(rt: Runtime, owner: str, content: bytes, purpose: str = "train", name: str = "corpus.txt") -> str:
    file_id = f"file-{secrets.token_hex(12)}"
    blob = rt.artifacts.write_stream(rt.artifacts.file_path(file_id), io.BytesIO(content), 1 << 30)
    with session_scope(rt.sessions) as session:
        return repository.create_file(session, owner, purpose, name, blob, 1, file_id=file_id).id


def train_job(rt: Runtime, owner: str, file_id: str, **hyper) -> str:
    params = {"model": TINY, "hyperparameters": {**HYPER, **hyper}, "seed": 1, "suffix": "t"}
    with session_scope(rt.sessions) as session:
        return repository.create_job(session, owner, "train", params, training_file_id=file_id)[0].id


def job(rt: Runtime, job_id: str) -> Job:
    with session_scope(rt.sessions) as session:
        return session.get(Job, job_id)


def events(rt: Runtime, job_id: str) -> list[JobEvent]:
    with session_scope(rt.sessions) as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def register(rt: Runtime, owner: str, path) -> str:
    with session_scope(rt.sessions) as session:
        return repository.create_model(session, owner, "m", "import", str(path), {}, 1).id


def generate_job(rt: Runtime, owner: str, model_id: str, prompts: list[str]) -> str:
    sampling = {"max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
                "stop": [], "n": 1, "seed": 5}
    with session_scope(rt.sessions) as session:
        return repository.create_job(session, owner, "generate", {"model": model_id, "sampling": sampling,
                                                                   "prompts": prompts}, base_model_id=model_id)[0].id


def test_training_job_reports_progress_checkpoints_and_registers_its_model(rt, owner):
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS))
    run_training(rt, job_id)
    done = job(rt, job_id)
    assert done.status == "succeeded" and done.attempts == 1 and done.error is None
    assert done.progress["step"] == 6 and done.progress["total_steps"] == 6
    with session_scope(rt.sessions) as session:
        model = session.get(Model, done.result["model"])
        steps = list(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)
                                     .order_by(Checkpoint.step)))
    assert model.name == "gpt2-1x32:t" and model.source == "job" and model.job_id == job_id
    assert GPT2.from_pretrained(model.storage_path).config.n_embd == 32
    assert steps == [3, 6]
    kinds = {(e.type, e.level) for e in events(rt, job_id)}
    assert ("metrics", "info") in kinds
    assert any(e.data and "samples" in e.data for e in events(rt, job_id))

    run_training(rt, job_id)  # a redelivery of a finished job changes nothing
    assert job(rt, job_id).attempts == 1


def test_dataset_is_prepared_once_per_file_content(rt, owner):
    first = upload(rt, owner, CORPUS)
    second = upload(rt, owner, CORPUS, name="same-text.txt")
    for file_id in (first, second):
        run_training(rt, train_job(rt, owner, file_id, max_steps=1, eval_every=0, sample_every=0))
    assert len([p for p in (rt.artifacts.root / "datasets").iterdir() if p.is_dir()]) == 1


def test_a_delivery_while_another_worker_holds_the_lease_does_nothing(rt, owner):
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS))
    with session_scope(rt.sessions) as session:
        execution.claim_job(session, job_id, "other:1", 30)
    run_training(rt, job_id)
    held = job(rt, job_id)
    assert held.status == "running" and held.lease_owner == "other:1" and held.attempts == 1


def test_a_cancelled_job_s_message_is_skipped(rt, owner):
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS))
    with session_scope(rt.sessions) as session:
        repository.cancel_job(session, owner, job_id)
    run_training(rt, job_id)
    assert job(rt, job_id).status == "cancelled" and job(rt, job_id).attempts == 0


def test_a_training_file_too_short_for_the_model_fails_with_invalid_file(rt, owner):
    job_id = train_job(rt, owner, upload(rt, owner, b"just a few words"))
    run_training(rt, job_id)
    failed = job(rt, job_id)
    assert failed.status == "failed" and failed.result is None
    assert failed.error["code"] == "invalid_file" and failed.error["param"] == "training_file"
    assert any(e.level == "error" for e in events(rt, job_id))


def test_generation_with_missing_weights_fails_with_model_not_found(rt, owner, tmp_path):
    model_id = register(rt, owner, tmp_path / "nowhere")
    job_id = generate_job(rt, owner, model_id, ["Hello"])
    run_generation(rt, job_id)
    failed = job(rt, job_id)
    assert failed.status == "failed" and failed.error["code"] == "model_not_found"
    # The same on every try: the job fails at once, without retrying the shard.
    assert not any("retrying" in e.message for e in events(rt, job_id))


def test_generation_writes_one_result_per_prompt(rt, owner, tmp_path):
    torch.manual_seed(0)
    GPT2(GPT2Config(**TINY)).save_pretrained(tmp_path / "tiny")
    job_id = generate_job(rt, owner, register(rt, owner, tmp_path / "tiny"), ["Hello", "", "x " * 40])
    run_generation(rt, job_id)
    done = job(rt, job_id)
    assert done.status == "succeeded" and done.progress == {"total": 3, "completed": 2, "failed": 1}
    with session_scope(rt.sessions) as session:
        results, _ = repository.list_generation_results(session, owner, job_id, limit=10)
    assert [r.index for r in results] == [0, 1, 2]
    assert results[2].error["code"] == "prompt_too_long" and results[0].completions[0]["tokens"] == 4


def test_model_cache_keeps_at_most_its_capacity(tmp_path):
    paths = []
    for n in range(3):
        GPT2(GPT2Config(**TINY)).save_pretrained(tmp_path / f"m{n}")
        paths.append(Model(id=f"model-{n}", storage_path=str(tmp_path / f"m{n}")))
    cache = ModelCache()
    first = cache.get(paths[0], capacity=2)
    assert cache.get(paths[0], capacity=2) is first
    cache.get(paths[1], capacity=2)
    cache.get(paths[2], capacity=2)
    assert len(cache.models) == 2 and cache.get(paths[0], capacity=2) is not first


@pytest.mark.parametrize(("exc", "code"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
    (DatasetError("bad line"), "invalid_file"),
    (CheckpointError("missing tensor"), "invalid_model"),
    (JobFailure("model_not_found", "gone", "model"), "model_not_found"),
    (KeyError("surprise"), "internal_error"),
])
def test_failures_get_codes_a_user_can_act_on(exc, code):
    assert error_for(exc, "job-test")["code"] == code


def test_a_transient_database_error_is_retried_then_raised(rt, monkeypatch):
    monkeypatch.setattr("workers.runtime.time.sleep", lambda seconds: None)
    failures = [OperationalError("UPDATE ...", {}, Exception("deadlock detected"))] * 2

    def flaky(session):
        if failures:
            raise failures.pop()
        return "stored"

    assert rt.persist(flaky, patience=60) == "stored"

    def down(session):
        raise OperationalError("UPDATE ...", {}, Exception("server closed the connection"))

    with pytest.raises(OperationalError):
        rt.persist(down, patience=0)


def test_a_prompt_completion_file_trains_on_its_completions(rt, owner):
    """A prompt/completion training file, with the held-out tail and with a validation file of its own: the
    worker's prepared datasets carry the loss masks and the Trainer gets them (train and validation)."""
    import json

    from gpt2core import load_dataset

    lines = "".join(json.dumps({"prompt": f"Item {i} of the list, described at some length:",
                                "completion": f" number {i}."}) + "\n" for i in range(400)).encode()
    training = upload(rt, owner, lines, name="pairs.jsonl")
    validation = upload(rt, owner, b"".join(lines.splitlines(keepends=True)[:100]), name="val.jsonl")
    held_out = train_job(rt, owner, training, max_steps=2, eval_every=2, sample_every=0, checkpoint_every=0)
    params = {"model": TINY, "hyperparameters": {**HYPER, "max_steps": 2, "eval_every": 2, "sample_every": 0,
                                                 "checkpoint_every": 0}, "seed": 1, "suffix": "t"}
    with session_scope(rt.sessions) as session:
        separate = repository.create_job(session, owner, "train", params, training_file_id=training,
                                         validation_file_id=validation)[0].id
    for job_id in (held_out, separate):
        run_training(rt, job_id)
        done = job(rt, job_id)
        assert done.status == "succeeded", done.error
        assert done.result["val_loss"] is not None and done.result["train_loss"] > 0
    folders = [p for p in (rt.artifacts.root / "datasets").iterdir() if p.is_dir()]
    assert len(folders) == 3  # the training file split two ways, the validation file
    for folder in folders:
        ds = load_dataset(folder)
        assert ds.train_mask is not None and ds.train_mask.size == ds.train.size and 0 < ds.train_mask.mean() < 1


def test_auto_hyperparameters_are_resolved_once_and_stored(rt, owner):
    auto = {**HYPER, "max_steps": None, "n_epochs": "auto", "batch_size": "auto", "learning_rate": "auto",
            "warmup_steps": None, "eval_every": 0, "checkpoint_every": 0, "sample_every": 0}
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS[:3000]), **auto)
    run_training(rt, job_id)
    done = job(rt, job_id)
    assert done.status == "succeeded", done.error
    hyper = done.params["hyperparameters"]
    # ~740 training tokens in windows of 32: 23 examples -> 5 epochs, so that at least 100 examples are seen
    # (OpenAI's rule), in global batches of 1 (0.2% of the examples, at least 1); a 1.6M-parameter model: 1e-3
    assert (hyper["n_epochs"], hyper["batch_size"], hyper["grad_accum_steps"]) == (5.0, 1, 1)
    assert hyper["learning_rate"] == 1e-3 and hyper["auto"] == ["n_epochs", "batch_size", "learning_rate"]
    assert done.progress["total_steps"] == done.result["steps"] > 100
    [resolved] = [e for e in events(rt, job_id) if e.message.startswith("Resolved")]
    assert resolved.data["hyperparameters"] == hyper and "n_epochs 5, batch_size 1" in resolved.message


def test_messages_keep_api_routes_and_hide_server_paths():
    from workers.runtime import user_message

    text = "see /v1/jobs/job-1/checkpoints/ckpt-2/model; failed in /srv/var/artifacts/x.bin"
    assert user_message(text) == "see /v1/jobs/job-1/checkpoints/ckpt-2/model; failed in <server path>"
