"""gpt2core: an exact, fast GPT-2 library (model, tokenizer, data, training, generation, Hugging Face interop)."""
from .config import PRESETS, GPT2Config
from .device import default_device, set_default_device
from .hf import CheckpointError
from .model import GPT2
from .tokenizer import GPT2Tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "GPT2",
    "GPT2Config",
    "GPT2Tokenizer",
    "default_device",
    "set_default_device",
]
