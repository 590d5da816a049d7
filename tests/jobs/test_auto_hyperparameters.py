"""The rules behind "auto" hyperparameters (jobs.auto)."""
from __future__ import annotations

import pytest

from jobs.auto import (
    auto_epochs,
    auto_global_batch,
    auto_learning_rate,
    cpu_micro_batch_limit,
    resolve_auto,
    split_batch,
)
from jobs.specs import Hyperparameters


@pytest.mark.parametrize("examples,epochs", [(1, 25), (10, 10), (23, 5), (34, 3), (5000, 3), (8334, 2),
                                             (12_501, 1), (1_000_000, 1)])
def test_epochs_follow_openai_s_rule(examples, epochs):
    assert auto_epochs(examples) == epochs


@pytest.mark.parametrize("examples,batch", [(10, 1), (1000, 2), (4000, 8), (100_000, 256), (10_000_000, 256)])
def test_the_global_batch_is_about_a_fifth_of_a_percent(examples, batch):
    assert auto_global_batch(examples) == batch


def test_the_batch_splits_into_the_largest_micro_batch_that_fits():
    assert split_batch(64, 16) == (16, 4)
    assert split_batch(64, 100) == (64, 1)
    assert split_batch(12, 5) == (4, 3)
    assert split_batch(8, 0) == (1, 8)
    assert cpu_micro_batch_limit(1024) == 8 and cpu_micro_batch_limit(32) == 256


def test_learning_rates_follow_model_size_and_method():
    assert auto_learning_rate(124_000_000, "train") == 6e-4  # GPT-3 small's rate, for GPT-2 small
    assert auto_learning_rate(355_000_000, "train") == 3e-4
    assert auto_learning_rate(1_000_000, "train") == 1e-3
    assert auto_learning_rate(124_000_000, "full") == 6e-5
    assert auto_learning_rate(124_000_000, "lora") == 2e-4
    rates = [auto_learning_rate(n, "train") for n in (1e7, 5e7, 1.25e8, 3.5e8, 7.6e8, 1.3e9, 2.7e9, 1e10)]
    assert rates == sorted(rates, reverse=True)


def test_only_auto_values_are_resolved_and_named():
    given = Hyperparameters(max_steps=10, batch_size=4, learning_rate="auto")
    resolved = resolve_auto(given, examples=1000, parameters=124_000_000, method="full", max_micro_batch=8)
    assert (resolved.batch_size, resolved.learning_rate, resolved.auto) == (4, 6e-5, ["learning_rate"])
    plain = Hyperparameters(max_steps=10)
    assert resolve_auto(plain, examples=10, parameters=1, method="train", max_micro_batch=1) is plain


@pytest.mark.parametrize("devices", [2, 3, 4])
def test_an_auto_batch_gives_every_device_an_equal_share_that_fits(devices):
    given = Hyperparameters(max_steps=10, batch_size="auto")
    resolved = resolve_auto(given, examples=32_000, parameters=1, method="train", max_micro_batch=8, devices=devices)
    wanted = auto_global_batch(32_000)  # 64 windows
    assert resolved.batch_size <= 8 and (resolved.batch_size * resolved.grad_accum_steps) % devices == 0
    assert wanted <= resolved.batch_size * resolved.grad_accum_steps < wanted + devices * resolved.batch_size
    assert resolved.grad_accum_steps % devices == 0  # every device runs the same number of micro-batches
