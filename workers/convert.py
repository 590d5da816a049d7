"""The one place where the platform's typed job specifications (jobs.specs) become gpt2core objects."""
from __future__ import annotations

from pathlib import Path

import torch

from gpt2core import GPT2, GPT2Config, SamplingParams, TrainConfig
from jobs.specs import Hyperparameters, ModelShape, Sampling


def sampling_params(sampling: Sampling, seed: int) -> SamplingParams:
    """gpt2core's SamplingParams for one prompt; `seed` is that prompt's own (see workers.generation.item_seed)."""
    return SamplingParams(
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty, stop=tuple(sampling.stop),
        n=sampling.n, seed=seed,
    )


def model_config(choice: str | ModelShape) -> GPT2Config:
    """A preset name or a shape as gpt2core's GPT2Config (GPT-2's vocabulary)."""
    if isinstance(choice, str):
        return GPT2Config.preset(choice)
    return GPT2Config(n_layer=choice.n_layer, n_head=choice.n_head, n_embd=choice.n_embd,
                      block_size=choice.block_size)


def new_model(config: GPT2Config, seed: int) -> GPT2:
    """A freshly initialised model whose weights depend only on `config` and the job's `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2(config)


def train_config(hyper: Hyperparameters, *, steps: int, seed: int, evaluate: bool, checkpoint_dir: Path
                 ) -> TrainConfig:
    """gpt2core's TrainConfig for a job of `steps` optimizer steps; `evaluate` False when there is no validation
    data (the job is told so in a warning event)."""
    return TrainConfig(
        max_steps=steps, batch_size=hyper.batch_size, grad_accum_steps=hyper.grad_accum_steps,
        learning_rate=hyper.learning_rate, warmup_steps=min(hyper.warmup_steps or 0, steps),
        weight_decay=hyper.weight_decay, eval_every=hyper.eval_every if evaluate else 0,
        checkpoint_every=hyper.checkpoint_every, checkpoint_dir=checkpoint_dir,
        sample_every=hyper.sample_every, seed=seed,
    )
