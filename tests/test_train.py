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
        self.accuracies: list = []
        self.samples: list[tuple] = []
        self.checkpoints: list[tuple] = []
        self.polls = 0

    def on_step(self, metrics):
        self.steps.append(metrics)

    def on_eval(self, step, val_loss, perplexity, accuracy):
        self.evals.append((step, val_loss, perplexity))
        self.accuracies.append(accuracy)

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


# --------------------------------------------------------------------------------------------------
# Prompt/completion data: loss masks
# --------------------------------------------------------------------------------------------------


def pc_dataset(tmp_path, n: int = 80, val_fraction: float = 0.25):
    """A prepared prompt/completion dataset: long prompts, short completions."""
    import json

    records = [{"prompt": f"Question {i}: which number comes right after {i} when counting up? Answer:",
                "completion": f" {i + 1}, of course."} for i in range(n)]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare_dataset(tmp_path / "pc.jsonl", tmp_path / "ds", val_fraction=val_fraction)
    ds = load_dataset(tmp_path / "ds")
    assert ds.train_mask is not None and 0 < ds.train_mask.mean() < 0.5
    return ds


def tiny_gpt2(seed: int = 0, peaked: bool = True) -> GPT2:
    """The brief's tiny GPT-2; `peaked` scales the (tied) embeddings up so per-token losses differ a lot."""
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=64))
    if peaked:
        with torch.no_grad():
            model.transformer.wte.weight.mul_(40)
    return model


def windows(tokens, mask, starts, T):
    """Inputs, targets and the targets' mask (1 = counted) of the windows at `starts`, built by hand."""
    w = np.stack([np.asarray(tokens[s : s + T + 1], dtype=np.int64) for s in starts])
    m = np.ones_like(w) if mask is None else np.stack([np.asarray(mask[s : s + T + 1]) for s in starts])
    return torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:]), torch.from_numpy(m[:, 1:].astype(bool))


@torch.no_grad()
def direct(model, x, y, counted):
    """(sum of per-target cross-entropies in float64, correct argmax predictions, counted targets), by hand."""
    logits, _ = model(x)
    nll = -torch.log_softmax(logits.double(), dim=-1).gather(-1, y[..., None]).squeeze(-1)
    return nll[counted].sum().item(), int((logits.argmax(-1) == y)[counted].sum()), int(counted.sum())


def loader_starts(n_tokens: int, T: int, B: int, seed: int, index: int) -> np.ndarray:
    """Where BatchLoader batch `index` starts its windows (its documented rule)."""
    return np.random.default_rng([seed, index]).integers(0, n_tokens - T, size=B)


def test_completion_only_training_loss_equals_a_direct_computation(tmp_path):
    """The first step's loss is the completion targets' cross-entropy summed over both micro-batches and divided
    by their count (token-weighted, not a mean of micro-batch means), and clearly not the whole lines' loss."""
    ds = pc_dataset(tmp_path)
    T, B, seed = 48, 3, 5
    cfg = TrainConfig(max_steps=1, batch_size=B, block_size=T, grad_accum_steps=2, warmup_steps=0, device="cpu",
                      seed=seed)
    model = tiny_gpt2()
    model.train()  # dropout is 0: the step's forward computes what this does
    sums = [direct(model, *windows(ds.train, ds.train_mask, loader_starts(len(ds.train), T, B, seed, i), T))
            for i in range(2)]
    whole = [direct(model, *windows(ds.train, None, loader_starts(len(ds.train), T, B, seed, i), T)) for i in range(2)]
    counts = [c for _, _, c in sums]
    assert counts[0] != counts[1] and 0 < sum(counts) < sum(c for _, _, c in whole)
    expected = sum(s for s, _, _ in sums) / sum(counts)
    whole_loss = sum(s for s, _, _ in whole) / sum(c for _, _, c in whole)
    assert abs(expected - whole_loss) > 0.5  # masking the prompts matters
    loss = Trainer(model, cfg, ds.train, train_mask=ds.train_mask).train_step().loss
    assert loss == pytest.approx(expected, abs=1e-5)

    # The same data without its mask: the loss over whole lines.
    unmasked = Trainer(tiny_gpt2(), cfg, ds.train).train_step().loss
    assert unmasked == pytest.approx(whole_loss, abs=1e-5)


def test_plain_text_loss_is_what_it_was():
    """Without a mask the step's loss is the mean of its micro-batches' mean losses (every micro-batch has
    B * T targets), as before masks; an all-ones mask changes nothing at all."""
    data = random_tokens(3000, seed=4)
    cfg = TrainConfig(max_steps=3, batch_size=2, block_size=32, grad_accum_steps=3, warmup_steps=0, device="cpu")
    model = small_model(seed=3)
    with torch.no_grad():
        means = [model(x, y)[1].item() for x, y in (BatchLoader(data, 32, 2, seed=cfg.seed).batch(i) for i in range(3))]
    trainer = Trainer(model, cfg, data)
    assert trainer.train_step().loss == pytest.approx(sum(means) / 3, abs=1e-6)
    plain = Trainer(small_model(seed=3), cfg, data).fit().losses
    ones = Trainer(small_model(seed=3), cfg, data, train_mask=np.ones(len(data), np.uint8)).fit().losses
    assert plain == ones


def test_evaluate_scores_completions_only(tmp_path):
    """evaluate(): the mean loss over the counted (completion) targets of the deterministic windows, token
    accuracy (argmax == target among them) and their count, against a direct computation."""
    from gpt2core import EvalResult
    from gpt2core.data import eval_window_starts

    ds = pc_dataset(tmp_path, n=120)
    T = 32
    cfg = TrainConfig(batch_size=3, block_size=T, device="cpu", eval_windows=5)
    model = tiny_gpt2()
    trainer = Trainer(model, cfg, ds.train, ds.val, train_mask=ds.train_mask, val_mask=ds.val_mask)
    loss = trainer.evaluate()
    starts = eval_window_starts(len(ds.val), T, cfg.eval_windows)
    assert len(starts) == 5
    model.eval()
    total, correct, count = direct(model, *windows(ds.val, ds.val_mask, starts, T))
    assert isinstance(trainer.last_eval, EvalResult)
    assert trainer.last_eval.tokens == count and 0 < count < 5 * T
    assert loss == trainer.last_eval.loss == pytest.approx(total / count, abs=1e-5)
    assert trainer.last_eval.accuracy == pytest.approx(correct / count, abs=1e-12)

    # Without the mask, every target counts: the loss over whole lines.
    whole = Trainer(model, cfg, ds.train, ds.val)
    whole_loss = whole.evaluate()
    total, correct, count = direct(model, *windows(ds.val, None, starts, T))
    assert whole.last_eval.tokens == count == 5 * T and whole_loss == pytest.approx(total / count, abs=1e-5)
    assert whole.last_eval.accuracy == pytest.approx(correct / count, abs=1e-12)
    assert abs(whole_loss - loss) > 0.5


def test_token_accuracy_equals_a_direct_computation():
    """A model that has learnt a cycle of 10 tokens, 30% of them replaced by noise: its accuracy on the counted
    targets is neither 0 nor 1, and equals the fraction of them that are their position's argmax prediction."""
    from gpt2core.data import eval_window_starts

    rng = np.random.default_rng(0)
    data = np.tile(np.arange(10, dtype=np.uint16) * 7, 300)
    noise = rng.random(data.size) < 0.3
    data[noise] = rng.integers(0, 256, int(noise.sum()))
    mask = prompt_like_mask(data.size, seed=3)
    T = 32
    cfg = TrainConfig(max_steps=15, batch_size=8, block_size=T, learning_rate=3e-3, warmup_steps=2, device="cpu",
                      eval_windows=12)
    trainer = Trainer(small_model(), cfg, data[:2500], data[2500:], train_mask=mask[:2500], val_mask=mask[2500:])
    trainer.fit()
    loss = trainer.evaluate()
    trainer.model.eval()
    starts = eval_window_starts(500, T, cfg.eval_windows)
    total, correct, count = direct(trainer.model, *windows(data[2500:], mask[2500:], starts, T))
    assert trainer.last_eval.tokens == count
    assert 0 < correct < count and trainer.last_eval.accuracy == pytest.approx(correct / count, abs=1e-12)
    assert loss == pytest.approx(total / count, abs=1e-5)


def test_steps_and_evaluations_without_counted_targets():
    """A micro-batch whose targets are all masked adds nothing (no NaN); a step without any counted target
    changes no weight and reports 0.0; an evaluation without any raises ValueError."""
    T = 16
    data = random_tokens(T + 2, seed=9)
    mask = np.zeros(T + 2, np.uint8)
    mask[-1] = 1  # only the last token is a target: a window starting at 0 has none, one at 1 has one
    seed = next(s for s in range(100)
                if [int(loader_starts(T + 2, T, 1, s, i)[0]) for i in range(2)] == [0, 1])
    cfg = TrainConfig(max_steps=1, batch_size=1, block_size=T, grad_accum_steps=2, warmup_steps=0, device="cpu",
                      seed=seed)
    model = small_model(seed=2)
    x, y, counted = windows(data, mask, [1], T)
    model.train()
    total, _, count = direct(model, x, y, counted)
    assert count == 1
    assert Trainer(model, cfg, data, train_mask=mask).train_step().loss == pytest.approx(total, abs=1e-5)

    model = small_model(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, cfg, data, data, train_mask=np.zeros_like(mask), val_mask=np.zeros_like(mask))
    metrics = trainer.train_step()
    assert metrics.loss == 0.0 and metrics.step == 1
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="evaluation has no target to score"):
        trainer.evaluate()


def test_mask_arguments_are_checked():
    data = random_tokens(500)
    loader = BatchLoader(data, 16, 2, mask=np.ones(500, np.uint8))
    with pytest.raises(ValueError, match="train_data is a loader: give it the mask"):
        Trainer(small_model(), TrainConfig(device="cpu"), loader, train_mask=np.ones(500, np.uint8))
    with pytest.raises(ValueError, match="val_mask was given without val_data"):
        Trainer(small_model(), TrainConfig(device="cpu"), data, val_mask=np.ones(500, np.uint8))
    with pytest.raises(ValueError, match="loss mask has 499 entries"):
        Trainer(small_model(), TrainConfig(device="cpu"), data, train_mask=np.ones(499, np.uint8))


def prompt_like_mask(n: int, seed: int) -> np.ndarray:
    """Runs of 0s (prompts) and 1s (completions) of random lengths."""
    rng = np.random.default_rng(seed)
    runs = []
    while sum(len(r) for r in runs) < n:
        runs += [np.zeros(rng.integers(5, 40), np.uint8), np.ones(rng.integers(1, 12), np.uint8)]
    return np.concatenate(runs)[:n]


def run_masked(ckpt_dir, *, resume_from=None, stop_after=None):
    model = small_model(dropout=0.1, seed=123)
    data, mask = random_tokens(4000, seed=1), prompt_like_mask(4000, seed=2)
    cfg = TrainConfig(max_steps=6, batch_size=2, block_size=32, grad_accum_steps=2, learning_rate=1e-3,
                      warmup_steps=2, checkpoint_every=3, checkpoint_dir=ckpt_dir, eval_every=3, eval_windows=4,
                      device="cpu", seed=7)
    recorder = Recorder(stop_after=stop_after)
    trainer = Trainer(model, cfg, data[:3500], data[3500:], callbacks=[recorder], train_mask=mask[:3500],
                      val_mask=mask[3500:])
    if resume_from is not None:
        trainer.resume(resume_from)
    return trainer, trainer.fit(), recorder


def test_exact_resume_with_masks(tmp_path):
    full_trainer, full, _ = run_masked(tmp_path / "full")
    assert full.steps == 6 and all(math.isfinite(v) and v > 0 for v in full.losses)
    _, stopped, _ = run_masked(tmp_path / "stopped", stop_after=4)
    assert stopped.stopped and stopped.steps == 4
    resumed_trainer, rest, rec = run_masked(tmp_path / "stopped", resume_from=tmp_path / "stopped")
    assert [m.step for m in rec.steps] == [5, 6]
    np.testing.assert_allclose(stopped.losses + rest.losses, full.losses, rtol=0, atol=1e-6)
    assert rest.val_loss == pytest.approx(full.val_loss, abs=1e-6)
    assert resumed_trainer.last_eval.tokens == full_trainer.last_eval.tokens
    assert resumed_trainer.last_eval.accuracy == pytest.approx(full_trainer.last_eval.accuracy, abs=1e-9)
