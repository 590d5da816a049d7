"""How a worker sizes and places generation: batches of BATCH_PROMPTS on CPU, of what the GPU's free memory holds
on CUDA (still stopping between batches when shutting down), and models on the worker's device (on CUDA in bf16:
tests/test_cuda.py)."""
from types import SimpleNamespace

import pytest
import torch

from workers import generation
from workers.generation import BATCH_PROMPTS, Item, ShuttingDown, batch_prompts, for_generation, generate_items


def fake_model(device: str):
    return SimpleNamespace(device=torch.device(device))


def test_batch_prompts_follows_the_device(monkeypatch):
    monkeypatch.setattr(generation, "auto_batch_size", lambda model: 700)
    assert batch_prompts(fake_model("cpu")) == BATCH_PROMPTS
    assert batch_prompts(fake_model("cuda")) == 700
    monkeypatch.setattr(generation, "auto_batch_size", lambda model: 3)  # never fewer than on CPU
    assert batch_prompts(fake_model("cuda")) == BATCH_PROMPTS


def test_a_gpu_worker_generates_in_batches_of_what_fits_and_stops_between_them(monkeypatch):
    from jobs.specs import Sampling

    monkeypatch.setattr(generation, "auto_batch_size", lambda model: 100)
    calls: list[int] = []
    monkeypatch.setattr(generation, "generate_batch",
                        lambda model, job_id, items: calls.append(len(items)) or [{"index": i.index} for i in items])
    items = [Item(i, None, f"p{i}", Sampling(max_new_tokens=2, seed=1)) for i in range(250)]
    results = generate_items(fake_model("cuda"), "job-x", items)
    assert calls == [100, 100, 50] and [r["index"] for r in results] == list(range(250))
    answers = iter([False, True])
    calls.clear()
    with pytest.raises(ShuttingDown):
        generate_items(fake_model("cuda"), "job-x", items, lambda: next(answers))
    assert calls == [100]


def test_cpu_workers_keep_models_as_loaded(tiny_model):
    assert for_generation(tiny_model, torch.device("cpu")) is tiny_model
    assert tiny_model.device.type == "cpu" and tiny_model.transformer.wte.weight.dtype == torch.float32
