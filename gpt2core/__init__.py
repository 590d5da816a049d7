"""gpt2core: an exact, fast GPT-2 library (model, tokenizer, data, training, generation, Hugging Face interop)."""
from .config import PRESETS, GPT2Config
from .data import BatchLoader, DatasetError, load_dataset, prepare_dataset
from .device import default_device, set_default_device
from .generation import Completion, GenerationResult, PromptTooLongError, SamplingParams, generate
from .hf import CheckpointError
from .model import GPT2
from .tokenizer import GPT2Tokenizer
from .train import Trainer, TrainerCallback, TrainConfig, TrainResult

__all__ = [
    "PRESETS",
    "BatchLoader",
    "CheckpointError",
    "Completion",
    "DatasetError",
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
    "default_device",
    "generate",
    "load_dataset",
    "prepare_dataset",
    "set_default_device",
]
