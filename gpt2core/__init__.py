"""gpt2core: an exact, fast GPT-2 library (model, tokenizer, data, training, generation, Hugging Face interop).

The public names below are imported lazily (PEP 562), on first access: ``import gpt2core.checkpoint`` or
``gpt2core.config`` alone does not import torch, so torch-free code (the web API's upload checks) can use them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS = {
    "PRESETS": "config",
    "GPT2Config": "config",
    "BatchLoader": "data",
    "DatasetError": "data",
    "load_dataset": "data",
    "prepare_dataset": "data",
    "default_device": "device",
    "set_default_device": "device",
    "DistributedContext": "distributed",
    "init_distributed": "distributed",
    "shutdown_distributed": "distributed",
    "split_global_batch": "distributed",
    "Completion": "generation",
    "GenerationResult": "generation",
    "PromptTooLongError": "generation",
    "SamplingParams": "generation",
    "generate": "generation",
    "CheckpointError": "checkpoint",
    "GPT2": "model",
    "GPT2Tokenizer": "tokenizer",
    "EvalResult": "train",
    "Trainer": "train",
    "TrainerCallback": "train",
    "TrainConfig": "train",
    "TrainResult": "train",
    "EarlyStopping": "stopping",
    "LossWatchdog": "stopping",
    "TrainingDiverged": "stopping",
}

__all__ = [
    "PRESETS",
    "BatchLoader",
    "CheckpointError",
    "Completion",
    "DatasetError",
    "DistributedContext",
    "EvalResult",
    "GPT2",
    "GPT2Config",
    "GPT2Tokenizer",
    "GenerationResult",
    "PromptTooLongError",
    "SamplingParams",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerCallback",
    "EarlyStopping",
    "LossWatchdog",
    "TrainingDiverged",
    "default_device",
    "generate",
    "init_distributed",
    "load_dataset",
    "prepare_dataset",
    "set_default_device",
    "shutdown_distributed",
    "split_global_batch",
]

if TYPE_CHECKING:
    from .checkpoint import CheckpointError
    from .config import PRESETS, GPT2Config
    from .data import BatchLoader, DatasetError, load_dataset, prepare_dataset
    from .device import default_device, set_default_device
    from .distributed import DistributedContext, init_distributed, shutdown_distributed, split_global_batch
    from .generation import Completion, GenerationResult, PromptTooLongError, SamplingParams, generate
    from .model import GPT2
    from .tokenizer import GPT2Tokenizer
    from .stopping import EarlyStopping, LossWatchdog, TrainingDiverged
    from .train import EvalResult, Trainer, TrainerCallback, TrainConfig, TrainResult


# Submodules, reachable as attributes (gpt2core.hf) as they were when this package imported them all eagerly.
_SUBMODULES = {"callbacks", "checkpoint", "config", "corpus", "data", "device", "distributed", "generation", "hf", "model", "stopping",
               "tokenizer", "train", "train_config", "trainer_state"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
