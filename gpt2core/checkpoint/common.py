"""What the checkpoint check's parts share: file names, limits, dtypes, the error and the result."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# In the order transformers looks for them.
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)

MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 16 << 20
# The safetensors library refuses headers over 100,000,000 bytes; so do we (a real header is a few kilobytes).
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_PICKLE_BYTES = 64 << 20

LOADABLE_DTYPES = ("F32", "F16", "BF16", "F64")
# Bytes per element of the safetensors dtypes (sub-byte float formats are left out: nothing here could use them).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
# torch.save names a tensor's storage by its dtype; these are the dtypes, in safetensors spelling.
TORCH_STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
}  # fmt: skip

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
IGNORED_PREFIXES = ("score.", "multiple_choice_head.", "qa_outputs.", "classifier.")
# Flags of transformers' GPT2Config that change the computation; only GPT-2's own values are supported.
FIXED_FLAGS = (
    ("scale_attn_weights", True),
    ("scale_attn_by_inverse_layer_idx", False),
    ("reorder_and_upcast_attn", False),
    ("tie_word_embeddings", True),
    ("add_cross_attention", False),
)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# transformers' GPT2Config defaults, used when config.json leaves a field out.
CONFIG_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
LAYER_TENSORS = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip
LAYER_NAME = re.compile(r"h\.(0|[1-9][0-9]{0,8})\.(.+)")  # at most 9 digits: int() of it stays cheap


#: (dtype in safetensors spelling, shape) of one stored tensor.
TensorMeta = tuple[str, tuple[int, ...]]


class CheckpointError(ValueError):
    """A directory that is not a loadable GPT-2 checkpoint; the message says what is wrong, naming files relative
    to the checkpoint folder (never the folder's path)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`check_checkpoint` found in a loadable checkpoint.

    ``config`` is config.json as read; the named fields are its values with transformers' defaults filled in.
    ``tensors`` maps each used tensor's normalised name (no ``transformer.`` prefix), in model order, to its
    (dtype, shape, file), the file named relative to the folder: e.g. ``"h.0.attn.c_attn.weight": ("F16",
    (768, 2304), "model.safetensors")``. ``ignored`` lists, sorted, the normalised names of tensors present but
    not used. ``parameter_count`` counts GPT-2's parameters with the tied token embedding once (the gpt2 preset:
    124,439,808).
    """

    config: dict[str, Any]
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    n_inner: int | None
    layer_norm_epsilon: float
    parameter_count: int
    tensors: dict[str, tuple[str, tuple[int, ...], str]] = field(repr=False)
    ignored: list[str] = field(default_factory=list)

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def files(self) -> list[str]:
        """The weight files the used tensors come from, in the order first needed."""
        return list(dict.fromkeys(file for _, _, file in self.tensors.values()))


def normalise_key(key: str) -> str:
    """A tensor name without the ``transformer.`` prefix of GPT2LMHeadModel checkpoints."""
    return key[len("transformer.") :] if key.startswith("transformer.") else key




def _json_value(value: Any) -> str:
    """A config value for a message, cut short (values come from the user's file)."""
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
