"""The Trainer: optimisation details, callbacks, checkpoints, exact resume, and that it visibly learns."""
from __future__ import annotations

import errno
import math
import os
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2core import GPT2, GPT2Config
from gpt2core.data import BatchLoader, load_dataset, prepare_dataset
from gpt2core.train import (
    STATE_FILE,
    Sample,
    StepMetrics,
    TrainConfig,
    Trainer,
    TrainerCallback,
    decay_parameter_names,
    latest_checkpoint,
    learning_rate_at,
    list_checkpoints,
)


def small_model(vocab_size: int = 256, dropout: float = 0.0, seed: int = 0, **kw) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=vocab_size, dropout=dropout, **kw))


def random_tokens(n: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


class Recorder(TrainerCallback):
    """Records every event; stops once `stop_after` steps have been seen."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.steps: list[StepMetrics] = []
        self.evals: list[tuple] = []
        self.samples: list[tuple] = []
        self.checkpoints: list[tuple] = []
        self.polls = 0

    def on_step(self, metrics):
        self.steps.append(metrics)

    def on_eval(self, step, val_loss, perplexity):
        self.evals.append((step, val_loss, perplexity))

    def on_sample(self, step, samples):
        self.samples.append((step, samples))

    def on_checkpoint(self, step, path, train_loss, val_loss):
        self.checkpoints.append((step, Path(path), train_loss, val_loss))

    def should_stop(self):
        self.polls += 1
        return self.stop_after is not None and len(self.steps) >= self.stop_after

    @property
    def losses(self):
        return [m.loss for m in self.steps]


# --------------------------------------------------------------------------------------------------
# Configuration, schedule, optimizer groups
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_steps", 0),
        ("batch_size", -1),
        ("grad_accum_steps", 0),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("min_lr", 1.0),
        ("warmup_steps", -5),
        ("weight_decay", -0.1),
        ("betas", (0.9,)),
        ("betas", (0.9, 1.5)),
        ("grad_clip", -1.0),
        ("eval_every", -1),
        ("eval_windows", 0),
        ("sample_prompts", "not a list"),
        ("block_size", 0),
        ("checkpoint_every", 10),  # without checkpoint_dir
        ("keep_last_checkpoints", 0),
        ("device", "not-a-device"),
        ("compile", "yes"),
        ("dtype", "float16"),
        ("max_steps", True),
    ],
)
def test_train_config_validation_names_the_field(field, value):
    name = "checkpoint_dir" if field == "checkpoint_every" else field
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name}\b"):
        TrainConfig(**{field: value})


def test_train_config_defaults():
    cfg = TrainConfig(learning_rate=3e-4)
    assert cfg.min_lr == pytest.approx(3e-5)
    assert cfg.betas == (0.9, 0.95) and cfg.grad_clip == 1.0 and cfg.dtype == "auto" and cfg.compile is False


def test_block_size_larger_than_model_is_rejected():
    with pytest.raises(ValueError, match="TrainConfig.block_size"):
        Trainer(small_model(), TrainConfig(block_size=65, device="cpu"), random_tokens(1000))


def test_learning_rate_schedule_values():
    kw = dict(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lr = [learning_rate_at(s, **kw) for s in range(120)]
    assert lr[0] == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr[4] == pytest.approx(5e-4)
    assert lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)
    assert lr[60] == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the cosine
    assert lr[35] == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi * 0.25)) / 2)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # monotone decay after warmup
    assert lr[109] > 1e-4 and lr[110] == lr[119] == pytest.approx(1e-4)
    assert learning_rate_at(0, learning_rate=1.0, min_lr=0.0, warmup_steps=0, max_steps=4) == 1.0
    assert TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110).lr_at(60) == lr[60]


def test_weight_decay_only_on_matrices_and_embeddings():
    model = small_model()
    decay, no_decay = decay_parameter_names(model)
    assert set(decay) == {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        *(f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    }
    assert all(n.endswith(".bias") or ".ln_" in n for n in no_decay)
    assert "transformer.ln_f.weight" in no_decay and "transformer.h.0.ln_1.bias" in no_decay
    trainer = Trainer(model, TrainConfig(weight_decay=0.1, device="cpu"), random_tokens(1000))
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())  # each (tied) parameter exactly once


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_loss_decreases_on_repeated_text(tokenizer):
    ids = np.array(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 100), dtype=np.uint16)
    model = small_model(vocab_size=50257)
    cfg = TrainConfig(max_steps=30, batch_size=4, block_size=32, learning_rate=3e-3, warmup_steps=3, device="cpu")
    result = Trainer(model, cfg, ids).fit()
    assert result.steps == 30 and not result.stopped and len(result.losses) == 30
    assert result.losses[0] > 10
    assert np.mean(result.losses[-5:]) < result.losses[0] - 5  # a 10-token cycle is nearly memorised
    assert result.final_loss == result.losses[-1]


def test_finetune_from_pretrained_and_loader_inputs(tmp_path):
    data = random_tokens(3000)
    model = small_model()
    model.save_pretrained(tmp_path / "base")
    loaded = GPT2.from_pretrained(tmp_path / "base", tokenizer_vocab_size=None)  # a 256-token model
    data.tofile(tmp_path / "train.bin")
    loader = BatchLoader(tmp_path / "train.bin", block_size=32, batch_size=4, seed=5)
    cfg = TrainConfig(max_steps=3, warmup_steps=0, device="cpu", eval_every=3, eval_windows=2)
    result = Trainer(loaded, cfg, loader, torch.from_numpy(data[:500].astype(np.int64))).fit()
    assert result.steps == 3 and loader.position == 3 and result.val_loss is not None
    assert result.perplexity == pytest.approx(math.exp(result.val_loss))


def run_training(ckpt_dir, *, resume_from=None, stop_after=None, max_steps=8, checkpoint_every=3):
    """A run with dropout and gradient accumulation on a freshly built model."""
    model = small_model(dropout=0.1, seed=123)
    data = random_tokens(4000, seed=1)
    cfg = TrainConfig(
        max_steps=max_steps,
        batch_size=2,
        block_size=32,
        grad_accum_steps=2,
        learning_rate=1e-3,
        warmup_steps=2,
        checkpoint_every=checkpoint_every,
        checkpoint_dir=ckpt_dir,
        eval_every=4,
        eval_windows=2,
        device="cpu",
        seed=7,
    )
    recorder = Recorder(stop_after=stop_after)
    trainer = Trainer(model, cfg, data[:3500], data[3500:], callbacks=[recorder])
    if resume_from is not None:
        trainer.resume(resume_from)
    return trainer, trainer.fit(), recorder


def test_exact_resume_from_periodic_and_stop_checkpoints(tmp_path):
    full_trainer, full, _ = run_training(tmp_path / "full")
    assert full.steps == 8
    assert [s for s, _ in list_checkpoints(tmp_path / "full")] == [3, 6, 8]  # every 3 steps, plus the final one

    # Resume from the periodic checkpoint at step 3 in a new model and trainer.
    resumed_trainer, resumed, rec = run_training(tmp_path / "resumed", resume_from=tmp_path / "full" / "step-000003")
    assert [m.step for m in rec.steps] == [4, 5, 6, 7, 8]
    np.testing.assert_allclose(resumed.losses, full.losses[3:], rtol=0, atol=1e-6)
    for (name, a), b in zip(full_trainer.model.state_dict().items(), resumed_trainer.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    # Stop at step 5 (not a checkpoint step), then resume from the run directory's latest checkpoint.
    _, stopped, _ = run_training(tmp_path / "stopped", stop_after=5)
    assert stopped.stopped and stopped.steps == 5
    assert latest_checkpoint(tmp_path / "stopped") == tmp_path / "stopped" / "step-000005"
    _, rest, _ = run_training(tmp_path / "stopped", resume_from=tmp_path / "stopped")
    assert rest.steps == 8 and not rest.stopped
    np.testing.assert_allclose(stopped.losses + rest.losses, full.losses, rtol=0, atol=1e-6)
    assert rest.val_loss == pytest.approx(full.val_loss, abs=1e-6)


def test_should_stop_stops_within_one_step_and_leaves_loadable_checkpoint(tmp_path):
    model = small_model()
    recorder = Recorder(stop_after=3)
    cfg = TrainConfig(max_steps=100, batch_size=2, block_size=16, checkpoint_dir=tmp_path / "run", device="cpu")
    result = Trainer(model, cfg, random_tokens(2000), callbacks=[recorder]).fit()
    assert result.stopped and result.steps == 3 and len(result.losses) == 3
    assert recorder.polls == 4  # polled before every step and once after the last
    ckpt = tmp_path / "run" / "step-000003"
    assert result.checkpoint == ckpt and recorder.checkpoints[-1][:2] == (3, ckpt)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step-000003"]  # no temporary directories
    reloaded = GPT2.from_pretrained(ckpt, tokenizer_vocab_size=None)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert state["step"] == 3 and state["train_loader"]["position"] == 3
    assert {"optimizer", "rng", "scheduler", "train_loss"} <= set(state)


def causes(exc: BaseException | None) -> list[BaseException]:
    found = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


# A checkpoint of small_model() takes about 1.5 MB: model.safetensors 0.5 MB, then trainer_state.pt 1 MB.
@pytest.mark.parametrize("size, failing", [("1700k", "model.safetensors"), ("2200k", "trainer_state.pt")])
def test_a_full_disk_fails_the_checkpoint_and_keeps_the_last_complete_one(tmp_path, tiny_disk, size, failing):
    run = tiny_disk(tmp_path / "run", size)  # room for one checkpoint, not two
    recorder = Recorder()
    cfg = TrainConfig(max_steps=4, batch_size=2, block_size=16, checkpoint_every=1, checkpoint_dir=run, device="cpu")
    with pytest.raises(Exception) as raised:
        Trainer(small_model(), cfg, random_tokens(2000), callbacks=[recorder]).fit()
    disk_full = [e for e in causes(raised.value) if isinstance(e, OSError) and e.errno == errno.ENOSPC]
    assert disk_full, f"no ENOSPC OSError in {causes(raised.value)!r}"
    if failing == "model.safetensors":  # safetensors' own error says it only in words: raised as an OSError
        assert raised.value is disk_full[0] and raised.value.filename == "model.safetensors"
    assert sorted(os.listdir(run)) == ["step-000001"]  # the partial step-2 checkpoint is gone
    assert [c[0] for c in recorder.checkpoints] == [1]
    resumed = Trainer(small_model(seed=1), cfg, random_tokens(2000))
    assert resumed.resume(run) == run / "step-000001" and resumed.step == 1


def test_callbacks_receive_step_eval_and_checkpoint_events(tmp_path):
    recorder = Recorder()
    cfg = TrainConfig(
        max_steps=5, batch_size=2, block_size=16, grad_accum_steps=2, learning_rate=1e-3, warmup_steps=2,
        eval_every=2, eval_windows=3, checkpoint_every=2, checkpoint_dir=tmp_path, keep_last_checkpoints=2, device="cpu",
    )
    t0 = time.perf_counter()
    result = Trainer(small_model(), cfg, random_tokens(2000), random_tokens(500, seed=2), callbacks=[recorder]).fit()
    assert {f.name for f in fields(StepMetrics)} >= {"step", "loss", "learning_rate", "tokens_per_second", "grad_norm", "elapsed"}
    assert [m.step for m in recorder.steps] == [1, 2, 3, 4, 5]
    for m in recorder.steps:
        assert m.learning_rate == pytest.approx(cfg.lr_at(m.step - 1))
        assert math.isfinite(m.loss) and m.grad_norm > 0 and m.tokens_per_second > 0
        assert m.tokens == m.step * 2 * 2 * 16
    elapsed = [m.elapsed for m in recorder.steps]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= time.perf_counter() - t0
    # Evaluations at steps 2 and 4 and at the end; the same val batches each time, so an unchanged model gives
    # the same loss.
    assert [e[0] for e in recorder.evals] == [2, 4, 5]
    assert all(p == pytest.approx(math.exp(v)) for _, v, p in recorder.evals)
    assert result.val_loss == recorder.evals[-1][1]
    assert [(c[0], c[1].name) for c in recorder.checkpoints] == [(2, "step-000002"), (4, "step-000004"), (5, "step-000005")]
    assert recorder.checkpoints[1][2] == recorder.steps[3].loss and recorder.checkpoints[1][3] == recorder.evals[1][1]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]  # keep_last_checkpoints=2


def test_evaluation_is_deterministic():
    trainer = Trainer(small_model(), TrainConfig(eval_windows=3, batch_size=2, block_size=16, device="cpu"),
                      random_tokens(2000), random_tokens(300, seed=3))
    assert trainer.evaluate() == trainer.evaluate()


def test_evaluation_scores_every_window_of_the_split_whatever_the_seed():
    """Validation loss is the token-weighted mean over the split's non-overlapping windows (a last partial batch
    weighs what its tokens weigh), the same for runs with different seeds and batch sizes."""
    model, val = small_model(), random_tokens(333, seed=3)
    losses = []
    for seed, batch_size in ((1, 2), (99, 3), (5, 64)):
        cfg = TrainConfig(batch_size=batch_size, block_size=16, device="cpu", seed=seed)
        losses.append(Trainer(model, cfg, random_tokens(2000), val).evaluate())
    windows = torch.stack([torch.as_tensor(val[k * 16: k * 16 + 17], dtype=torch.long) for k in range(332 // 16)])
    with torch.no_grad():
        model.eval()
        logits, _ = model(windows[:, :-1])
        direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten()).item()
    assert losses[0] == pytest.approx(direct, rel=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_evaluation_windows_of_a_large_split_are_a_fixed_even_subset():
    from gpt2core.data import eval_window_starts

    assert eval_window_starts(100, 16, 10).tolist() == [0, 16, 32, 48, 64, 80]  # (100 - 1) // 16 = 6 windows
    assert eval_window_starts(16, 16, 10).tolist() == []  # no room for a window and its targets
    many = eval_window_starts(1_000_001, 100, 256)
    assert len(many) == 256 and many[0] == 0 and many[-1] <= 1_000_001 - 101
    gaps = np.diff(many)
    assert set(gaps.tolist()) <= {3900, 4000}  # evenly spread: 10,000 windows, every ~39th


def test_samples_reach_callbacks(tmp_path):
    recorder = Recorder()
    cfg = TrainConfig(max_steps=2, batch_size=2, block_size=16, sample_every=1, sample_prompts=["Hello", ""],
                      sample_max_new_tokens=5, device="cpu")
    trainer = Trainer(small_model(vocab_size=50257), cfg, random_tokens(500, vocab=50257), callbacks=[recorder])
    rng_before = torch.get_rng_state()
    samples = trainer.sample()
    assert torch.equal(torch.get_rng_state(), rng_before)  # sampling leaves the training RNG alone
    trainer.fit()
    assert [s for s, _ in recorder.samples] == [1, 2]
    for _, batch in [(0, samples)] + recorder.samples:
        assert [s.prompt for s in batch] == ["Hello", ""]
        assert all(isinstance(s, Sample) and isinstance(s.text, str) and s.text for s in batch)


# --------------------------------------------------------------------------------------------------
# It learns real text
# --------------------------------------------------------------------------------------------------


def test_visibly_learns_python_docs(tmp_path):
    """A 2-layer model trained for 150 steps on pydoc_data.topics beats the unigram entropy by far.

    For speed the corpus's GPT-2 token ids are relabelled densely (5,171 distinct ids), so the model's vocabulary
    is that size instead of 50,257; relabelling changes no entropy, and the data goes through prepare_dataset.
    """
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics.values())
    (tmp_path / "topics.txt").write_text(text, encoding="utf-8")
    prepare_dataset(tmp_path / "topics.txt", tmp_path / "ds", val_fraction=0.1)
    ds = load_dataset(tmp_path / "ds")
    ids, dense = np.unique(np.concatenate([ds.train, ds.val]), return_inverse=True)
    train, val = dense[: len(ds.train)], dense[len(ds.train) :]
    counts = np.bincount(train)
    p = counts[counts > 0] / len(train)
    entropy = float(-(p * np.log(p)).sum())  # nats per token of a model that knows only token frequencies
    assert 5.0 < entropy < 6.5

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=len(ids)))
    cfg = TrainConfig(max_steps=150, batch_size=16, learning_rate=3e-3, warmup_steps=15, eval_every=75,
                      eval_windows=160, device="cpu")
    result = Trainer(model, cfg, train, val).fit()
    print(f"val loss {result.val_loss:.3f} vs unigram entropy {entropy:.3f} nats")
    assert result.val_loss < entropy - 1.5
