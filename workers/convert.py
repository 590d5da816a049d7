"""The one place where the platform's typed job specifications (jobs.specs) become gpt2core objects."""
from __future__ import annotations

from pathlib import Path

import torch

from gpt2core import GPT2, GPT2Config, SamplingParams, TrainConfig
from gpt2core.lora import LoraSettings  # torch only: peft is imported when a model is wrapped
from jobs.specs import Hyperparameters, LoraMethod, ModelShape, Sampling


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


def lora_settings(method: LoraMethod) -> LoraSettings:
    """A finetune job's LoRA method as gpt2core's LoraSettings."""
    return LoraSettings(rank=method.rank, alpha=method.alpha, dropout=method.dropout,
                        target_modules=tuple(method.target_modules))


def new_model(config: GPT2Config, seed: int) -> GPT2:
    """A freshly initialised model whose weights depend only on `config` and the job's `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2(config)


#: torch.compile is worth its start-up (tens of seconds for GPT-2 small) on runs at least this long.
COMPILE_MIN_STEPS = 500


def compiles(device_type: str, steps: int, lora: bool) -> bool:
    """Whether a run is compiled (torch.compile): on CUDA, for runs of COMPILE_MIN_STEPS steps or more, not for
    LoRA (peft's wrapper). On CPU it does not pay off for these models. A graph the compiler cannot handle runs
    eagerly (gpt2core.train sets torch._dynamo's suppress_errors), so compiling never fails a job."""
    return device_type == "cuda" and steps >= COMPILE_MIN_STEPS and not lora


def train_config(hyper: Hyperparameters, *, steps: int, seed: int, evaluate: bool, checkpoint_dir: Path,
                 compile: bool = False) -> TrainConfig:
    """gpt2core's TrainConfig for a job of `steps` optimizer steps; `evaluate` False when there is no validation
    data (the job is told so in a warning event: early stopping and select_model "best" then cannot act either).
    The hyperparameters' "auto" values must be resolved (jobs.auto) before; warmup_steps None (a run in epochs
    that gave none) is a tenth of the run, at most 100."""
    assert not isinstance(hyper.batch_size, str) and not isinstance(hyper.learning_rate, str), "resolve auto first"
    warmup = hyper.warmup_steps if hyper.warmup_steps is not None else min(100, steps // 10)
    return TrainConfig(
        max_steps=steps, batch_size=hyper.batch_size, grad_accum_steps=hyper.grad_accum_steps,
        learning_rate=hyper.learning_rate, warmup_steps=min(warmup, steps),
        weight_decay=hyper.weight_decay, eval_every=hyper.eval_every if evaluate else 0,
        checkpoint_every=hyper.checkpoint_every, checkpoint_dir=checkpoint_dir,
        sample_every=hyper.sample_every, seed=seed,
        early_stopping_patience=hyper.early_stopping_patience if evaluate else 0,
        checkpoint_best=hyper.select_model == "best" and evaluate and bool(hyper.eval_every),
        divergence_threshold=hyper.divergence_threshold, divergence_patience=hyper.divergence_patience,
        compile=compile,
    )
