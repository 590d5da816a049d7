"""Stopping early: the divergence guard and early stopping on validation loss (gpt2core.stopping, Trainer.fit)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydoc_data.topics import topics

from gpt2core import GPT2, GPT2Config, GPT2Tokenizer, Trainer, TrainConfig
from gpt2core.stopping import EarlyStopping, LossWatchdog, TrainingDiverged
from gpt2core.train import list_checkpoints

TEXTS = list(topics.values())


@pytest.fixture(scope="module")
def tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def english(tokenizer) -> np.ndarray:
    return np.array(tokenizer.encode(" ".join(TEXTS[:40])), dtype=np.uint16)


def small_model(block_size: int = 64, seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=block_size))


# --- the watchdog alone -------------------------------------------------------------------------------------------


def test_a_single_spike_is_forgiven_and_a_sustained_one_is_not():
    dog = LossWatchdog(threshold=2.0, patience=3)
    for step, loss in enumerate([10.0, 9.0, 40.0, 8.5, 8.0], start=1):  # one spike, then healthy again...
        dog.observe(step, loss)
    assert dog.alarmed  # ...but not for long enough yet: no checkpoint now
    dog.observe(6, 8.2)
    assert not dog.alarmed
    for step, loss in [(7, 50.0), (8, 60.0), (9, 12.0)]:  # a blow-up that swings back below the threshold once
        dog.observe(step, loss)
    assert dog.alarmed
    with pytest.raises(TrainingDiverged) as raised:
        dog.observe(10, 70.0)
    assert raised.value.step == 10 and raised.value.first_bad_step == 7
    assert "70.00 at step 10" in str(raised.value) and "at 3 of the 4 steps since step 7" in str(raised.value)


def test_a_non_finite_loss_stops_at_once_even_with_the_relative_check_off():
    dog = LossWatchdog(threshold=0, patience=5)
    dog.observe(1, 3.0)
    dog.observe(2, 1e6)  # off: no relative check
    with pytest.raises(TrainingDiverged):
        dog.observe(3, math.nan)


def test_small_losses_need_a_real_excess_to_count():
    dog = LossWatchdog(threshold=3.0, patience=1)
    dog.observe(1, 0.01)
    dog.observe(2, 0.5)  # fifty times the level, but less than a nat above it: a memorised file, not a blow-up


@pytest.mark.parametrize("kwargs", [{"threshold": 0.5}, {"threshold": math.inf}, {"patience": 0}])
def test_invalid_watchdog_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        LossWatchdog(**kwargs)


def test_early_stopping_counts_evaluations_without_a_new_best():
    rule = EarlyStopping(patience=2)
    assert rule.observe(10, 3.0) and rule.observe(20, 2.5)
    assert not rule.observe(30, 2.6) and not rule.should_stop
    assert not rule.observe(40, 2.5)  # equal is not better
    assert rule.should_stop and rule.best_step == 20 and rule.best_loss == 2.5


# --- through the Trainer ------------------------------------------------------------------------------------------


def test_a_learning_rate_of_one_ends_in_training_diverged_with_no_bad_checkpoint(english, tmp_path):
    config = TrainConfig(max_steps=50, batch_size=4, learning_rate=1.0, warmup_steps=0, checkpoint_every=1,
                         checkpoint_dir=tmp_path)
    trainer = Trainer(small_model(), config, english)
    with pytest.raises(TrainingDiverged) as raised:
        trainer.fit()
    diverged = raised.value
    assert diverged.step <= 10 and diverged.loss > 2 * diverged.level
    steps = [step for step, _ in list_checkpoints(tmp_path)]
    assert steps and max(steps) < diverged.first_bad_step  # the last checkpoint is a good one
    assert isinstance(diverged, FloatingPointError)  # what callers catching the old error still see


def test_a_healthy_run_never_trips_the_guard(english):
    trainer = Trainer(small_model(32), TrainConfig(max_steps=30, batch_size=4, learning_rate=3e-3, warmup_steps=5),
                      english)
    result = trainer.fit()
    assert result.stop_reason == "max_steps" and result.steps == 30
    assert trainer.watchdog.streak == 0


@pytest.fixture(scope="module")
def overfitting(tokenizer):
    """A tiny training text and validation on other topics: the validation loss falls, then rises (step 35 is
    the best of evaluations every 5 steps)."""
    train = np.array(tokenizer.encode(TEXTS[0][:3000]), dtype=np.uint16)
    val = np.array(tokenizer.encode(" ".join(TEXTS[50:60])), dtype=np.uint16)
    return train, val


def overfit_config(tmp_path, **kwargs) -> TrainConfig:
    return TrainConfig(max_steps=150, batch_size=8, learning_rate=3e-3, warmup_steps=5, eval_every=5,
                       eval_windows=32, checkpoint_dir=tmp_path, **kwargs)


def test_early_stopping_ends_a_run_whose_validation_loss_rises_and_keeps_the_best(overfitting, tmp_path):
    train, val = overfitting
    losses: list[tuple[int, float]] = []

    class Evals:
        def on_eval(self, step, val_loss, perplexity, accuracy):
            losses.append((step, val_loss))

    trainer = Trainer(small_model(32), overfit_config(tmp_path, early_stopping_patience=3, checkpoint_best=True),
                      train, val, [Evals()])
    result = trainer.fit()
    best_step, best_loss = min(losses, key=lambda item: (item[1], -item[0]))
    assert result.stop_reason == "early_stopping" and result.steps < 150
    assert result.best_step == best_step and result.best_val_loss == best_loss
    assert result.steps == losses[-1][0] and [s for s, _ in losses[-3:]] == [best_step + 5 * k for k in (1, 2, 3)]
    # the best model is on disk, and scores what it scored during training
    best = GPT2.from_pretrained(tmp_path / f"step-{best_step:06d}")
    rescored = Trainer(best, overfit_config(tmp_path / "rescore"), train, val).evaluate()
    assert rescored == pytest.approx(best_loss, abs=1e-5)


def test_early_stopping_decides_the_same_after_a_resume(overfitting, tmp_path):
    train, val = overfitting
    whole = Trainer(small_model(32), overfit_config(tmp_path / "a", early_stopping_patience=3), train, val).fit()

    class StopAt:
        def __init__(self, step):
            self.step, self.seen = step, 0

        def on_step(self, metrics):
            self.seen = metrics.step

        def should_stop(self):
            return self.seen >= self.step

    first = Trainer(small_model(32), overfit_config(tmp_path / "b", early_stopping_patience=3), train, val,
                    [StopAt(40)]).fit()
    assert first.stop_reason == "stopped" and first.steps == 40
    resumed = Trainer(small_model(32), overfit_config(tmp_path / "b", early_stopping_patience=3), train, val)
    resumed.resume()
    rest = resumed.fit()
    assert (rest.steps, rest.best_step, rest.stop_reason) == (whole.steps, whole.best_step, whole.stop_reason)
    assert first.losses + rest.losses == whole.losses


def test_stopping_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(early_stopping_patience=2)
    with pytest.raises(ValueError, match="divergence_threshold"):
        TrainConfig(divergence_threshold=1.0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(eval_every=5, checkpoint_best=True)
