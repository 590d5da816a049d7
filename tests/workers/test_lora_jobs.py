"""A LoRA finetune job run by the worker in-process against the real database (SQLite and PostgreSQL) and artifact
store: it trains peft's adapters on the registered base model, its checkpoints hold the merged model plus the
adapter, and the model it registers is a plain GPT-2 checkpoint with the adapters merged in."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from sqlalchemy import select
from transformers import GPT2LMHeadModel

from gpt2core import GPT2, GPT2Config
from jobs import repository
from jobs.checkpoint_models import register_checkpoint
from jobs.db import session_scope
from jobs.models import Checkpoint, Model
from workers.runtime import SHUTTING_DOWN
from workers.training import run_training

from .test_worker_runs import CORPUS, HYPER, events, job, register, upload

LORA = {"type": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["c_attn", "c_fc"]}


def finetune_job(rt, owner: str, file_id: str, model_id: str, method: dict) -> str:
    params = {"model": model_id, "hyperparameters": HYPER, "seed": 1, "suffix": "lora", "method": method}
    with session_scope(rt.sessions) as session:
        return repository.create_job(session, owner, "finetune", params, training_file_id=file_id,
                                     base_model_id=model_id)[0].id


def test_a_lora_finetune_job_registers_the_merged_model(rt, owner, tmp_path):
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32)).save_pretrained(tmp_path / "base")
    base_id = register(rt, owner, tmp_path / "base")
    job_id = finetune_job(rt, owner, upload(rt, owner, CORPUS), base_id, LORA)
    run_training(rt, job_id)
    done = job(rt, job_id)
    assert done.status == "succeeded" and done.error is None, done.error
    assert done.params["method"] == LORA
    assert any("of" in e.message and "parameters (LoRA adapters, rank 4)" in e.message for e in events(rt, job_id))

    with session_scope(rt.sessions) as session:
        model = session.get(Model, done.result["model"])
        checkpoints = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                           .order_by(Checkpoint.step)))
    # The registered model: a plain GPT-2 checkpoint, nothing of peft in it
    folder = Path(model.storage_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    tuned = GPT2.from_pretrained(folder).eval()
    assert tuned.num_parameters() == model.parameter_count == GPT2.from_pretrained(tmp_path / "base").num_parameters()
    # ... whose adapted weights moved and whose other weights are the base's
    ours, base = load_file(folder / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    changed = sorted(k for k in base if not torch.equal(ours[k], base[k]))
    assert changed == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"]
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(folder).eval()(x).logits, tuned(x)[0],
                                   rtol=0, atol=1e-4)

    # Each checkpoint: the merged model, the trainer state and the adapter (peft's format)
    assert [c.step for c in checkpoints] == [3, 6]
    last = Path(checkpoints[-1].storage_path)
    assert sorted(p.name for p in last.iterdir()) == ["adapter", "config.json", "model.safetensors", "trainer_state.pt"]
    assert load_file(last / "model.safetensors").keys() == ours.keys()
    # ... which registers as a model without the adapter or the trainer state
    registered, created = register_checkpoint(rt.sessions, rt.artifacts, owner, job_id, checkpoints[0].id)
    assert created and sorted(p.name for p in Path(registered.storage_path).iterdir()) == ["config.json",
                                                                                          "model.safetensors"]


def test_a_lora_job_handed_back_by_a_shutting_down_worker_resumes_exactly(isolated_rt, owner, tmp_path):
    """The next worker builds the base model with fresh adapters again and loads the checkpoint's adapter: the
    model it registers is the one an uninterrupted run of the same job registers, to the bit."""
    rt = isolated_rt
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=32)).save_pretrained(tmp_path / "base")
    base_id, file_id = register(rt, owner, tmp_path / "base"), upload(rt, owner, CORPUS)
    hyper = {**HYPER, "max_steps": 60, "eval_every": 0, "checkpoint_every": 0, "sample_every": 0, "warmup_steps": 6}
    method = {**LORA, "dropout": 0.1}

    def submit() -> str:
        params = {"model": base_id, "hyperparameters": hyper, "seed": 1, "method": method}
        with session_scope(rt.sessions) as session:
            return repository.create_job(session, owner, "finetune", params, training_file_id=file_id,
                                         base_model_id=base_id)[0].id

    interrupted, uninterrupted = submit(), submit()
    runner = threading.Thread(target=run_training, args=(rt, interrupted))
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while (job(rt, interrupted).progress or {}).get("step", 0) < 1:
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.02)
        SHUTTING_DOWN.set()
        runner.join(60)
    finally:
        SHUTTING_DOWN.clear()
    assert job(rt, interrupted).status == "queued"
    step = int([e.message for e in events(rt, interrupted) if "stopped:" in e.message][-1]
               .split("a checkpoint was saved at step ")[1].split(")")[0])
    assert 1 <= step < 60
    run_training(rt, interrupted)
    run_training(rt, uninterrupted)
    resumed, straight = job(rt, interrupted), job(rt, uninterrupted)
    assert (resumed.status, resumed.attempts, straight.status) == ("succeeded", 2, "succeeded")
    assert f"Resumed from the checkpoint at step {step}" in [e.message for e in events(rt, interrupted)]
    with session_scope(rt.sessions) as session:
        a, b = (load_file(Path(session.get(Model, j.result["model"]).storage_path) / "model.safetensors")
                for j in (resumed, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
