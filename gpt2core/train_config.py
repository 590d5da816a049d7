"""The Trainer's configuration (TrainConfig, validated on construction) and its learning-rate schedule."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

DTYPES = ("auto", "float32", "bfloat16")



@dataclass
class TrainConfig:
    """Training hyperparameters. Invalid values raise ValueError naming the field (``TrainConfig.<name>``).

    ``batch_size`` is the micro-batch; one optimizer step sees ``batch_size * grad_accum_steps`` windows of
    ``block_size`` tokens (None: the model's block_size). ``min_lr`` None means ``learning_rate / 10``.
    ``eval_every``, ``sample_every``, ``checkpoint_every`` are in optimizer steps; 0 turns that off. An
    evaluation scores the validation split's non-overlapping windows, at most ``eval_windows`` of them evenly
    spread (``Trainer.evaluate``): deterministic, the same for every run on the same split and block size.
    ``grad_clip`` 0 or None turns clipping off. ``keep_last_checkpoints`` (None: all) deletes older
    ``step-*`` directories after each new checkpoint.

    Stopping early (gpt2core.stopping): ``early_stopping_patience`` evaluations in a row without a validation loss
    more than ``early_stopping_min_delta`` below the best end the run (0: never); ``checkpoint_best`` writes a
    checkpoint at every evaluation that sets a new best, so the best model is on disk. The divergence guard
    raises ``TrainingDiverged`` when the training loss is not finite, or stays above ``divergence_threshold``
    times its recent level for ``divergence_patience`` steps (threshold 0: only non-finite losses); no periodic
    checkpoint is written while the loss is flagged.
    """

    max_steps: int = 1000
    batch_size: int = 8
    block_size: int | None = None
    grad_accum_steps: int = 1
    learning_rate: float = 6e-4
    min_lr: float | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    eval_every: int = 0
    eval_windows: int = 256
    sample_every: int = 0
    sample_prompts: Sequence[str] = ("",)  # "" starts from the end-of-text token: GPT-2's unconditional samples
    sample_max_new_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 200
    checkpoint_every: int = 0
    checkpoint_dir: str | Path | None = None
    keep_last_checkpoints: int | None = None
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    checkpoint_best: bool = False
    divergence_threshold: float = 2.0
    divergence_patience: int = 5
    seed: int = 1337
    device: str | torch.device | None = None
    compile: bool = False
    dtype: str = "auto"

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_windows", "sample_max_new_tokens",
                     "divergence_patience"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "a positive integer")
        for name in ("warmup_steps", "eval_every", "sample_every", "checkpoint_every", "sample_top_k",
                     "early_stopping_patience"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "an integer >= 0")
        if self.block_size is not None and (not is_int(self.block_size) or self.block_size < 1):
            fail("block_size", "a positive integer or None")
        if not is_num(self.learning_rate) or self.learning_rate <= 0:
            fail("learning_rate", "a number > 0")
        if self.min_lr is None:
            self.min_lr = self.learning_rate / 10
        if not is_num(self.min_lr) or not 0 <= self.min_lr <= self.learning_rate:
            fail("min_lr", f"a number in [0, learning_rate={self.learning_rate}]")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", "a number >= 0")
        betas = self.betas
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(is_num(b) and 0 <= b < 1 for b in betas)
        ):
            fail("betas", "two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        if not is_num(self.eps) or self.eps <= 0:
            fail("eps", "a number > 0")
        if self.grad_clip is not None and (not is_num(self.grad_clip) or self.grad_clip < 0):
            fail("grad_clip", "a number >= 0 or None")
        if isinstance(self.sample_prompts, str) or not all(isinstance(p, str) for p in self.sample_prompts):
            fail("sample_prompts", "a list of strings")
        self.sample_prompts = tuple(self.sample_prompts)
        if self.sample_every and not self.sample_prompts:
            fail("sample_prompts", "non-empty when sample_every is set")
        if not is_num(self.sample_temperature) or self.sample_temperature < 0:
            fail("sample_temperature", "a number >= 0")
        if self.checkpoint_every and self.checkpoint_dir is None:
            fail("checkpoint_dir", "set when checkpoint_every is set")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            fail("checkpoint_dir", "a path or None")
        if self.keep_last_checkpoints is not None and (
            not is_int(self.keep_last_checkpoints) or self.keep_last_checkpoints < 1
        ):
            fail("keep_last_checkpoints", "a positive integer or None")
        if not is_num(self.early_stopping_min_delta) or self.early_stopping_min_delta < 0:
            fail("early_stopping_min_delta", "a number >= 0")
        if not is_num(self.divergence_threshold) or not (self.divergence_threshold == 0 or self.divergence_threshold > 1):
            fail("divergence_threshold", "0 (off) or a number > 1")
        if not isinstance(self.checkpoint_best, bool):
            fail("checkpoint_best", "a bool")
        if (self.early_stopping_patience or self.checkpoint_best) and not self.eval_every:
            fail("eval_every", "set when early_stopping_patience or checkpoint_best is set")
        if self.checkpoint_best and self.checkpoint_dir is None:
            fail("checkpoint_dir", "set when checkpoint_best is set")
        if not is_int(self.seed):
            fail("seed", "an integer")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                fail("device", "a torch device (e.g. 'cpu', 'cuda', 'cuda:1') or None")
        if not isinstance(self.compile, bool):
            fail("compile", "a bool")
        if self.dtype not in DTYPES:
            fail("dtype", f"one of {', '.join(DTYPES)}")

    def lr_at(self, step: int) -> float:
        return learning_rate_at(
            step,
            learning_rate=self.learning_rate,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            max_steps=self.max_steps,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("checkpoint_dir", "device"):
            if d[key] is not None:
                d[key] = str(d[key])
        d["sample_prompts"] = list(self.sample_prompts)
        d["betas"] = list(self.betas)
        return d


def learning_rate_at(step: int, *, learning_rate: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based: the number of steps already taken).

    Linear warmup ``learning_rate * (step + 1) / warmup_steps`` for ``step < warmup_steps``; then cosine decay
    ``min_lr + (learning_rate - min_lr) * (1 + cos(pi * (step - warmup_steps) / (max_steps - warmup_steps))) / 2``;
    ``min_lr`` from ``max_steps`` on.
    """
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)
