"""Check a Hugging Face format GPT-2 checkpoint folder without torch: read config.json and the weight files'
headers, then the weights' values (for NaN and infinities), and say whether GPT2.from_pretrained can load it, or
exactly why not.

This package imports no torch (numpy only while it scans values), so the web API runs it on an uploaded model;
:func:`gpt2core.hf.load_pretrained` runs it too, before it loads a single weight. Modules: ``common`` (names,
limits, CheckpointError, CheckpointInfo), ``config_file`` (config.json), ``weight_files`` (safetensors headers,
torch.save archives through a restricted unpickler, sharded indexes), ``tensors`` (names and shapes against the
config), ``values`` (finite weights).

A checkpoint folder holds ``config.json`` and one weights layout, looked for in the order transformers'
``GPT2LMHeadModel.from_pretrained`` uses (so safetensors wins when both kinds are present):

1. ``model.safetensors``
2. ``model.safetensors.index.json`` and the shards its ``weight_map`` names
3. ``pytorch_model.bin`` (the zip archive ``torch.save`` has written since torch 1.6)
4. ``pytorch_model.bin.index.json`` and its shards

Tensor names may carry the ``transformer.`` prefix (GPT2LMHeadModel) or not (GPT2Model); it is dropped.
With C = n_embd, I = n_inner or 4 * C, V = vocab_size, P = n_positions, the checkpoint must hold exactly
(Conv1D layout: a projection's weight is [in, out])::

    wte.weight [V, C]                 wpe.weight [P, C]
    h.{i}.ln_1.weight, .bias [C]      h.{i}.attn.c_attn.weight [C, 3C], .bias [3C]
    h.{i}.ln_2.weight, .bias [C]      h.{i}.attn.c_proj.weight [C, C], .bias [C]
    ln_f.weight, .bias [C]            h.{i}.mlp.c_fc.weight [C, I], .bias [I]
                                      h.{i}.mlp.c_proj.weight [I, C], .bias [C]      (0 <= i < n_layer)

in F32, F16, BF16 or F64, and may also hold tensors that are not used: the causal-mask buffers
``*.attn.bias`` / ``*.attn.masked_bias``, ``lm_head.weight`` (tied to wte; [V, C] when present) and the heads of the
other GPT-2 classes (``score.*``, ``multiple_choice_head.*``, ``qa_outputs.*``, ``classifier.*``). Anything else is
refused. Every error message names files relative to the checkpoint folder, never the folder's own path.
"""
from __future__ import annotations

from pathlib import Path

from ..config import GPT2_VOCAB_SIZE
from .common import CheckpointError, CheckpointInfo, normalise_key
from .config_file import _config_fields, _read_config
from .tensors import _match_tensors, parameter_count
from .values import first_non_finite
from .weight_files import _read_weights

__all__ = ["CheckpointError", "CheckpointInfo", "check_checkpoint", "normalise_key", "parameter_count"]


def check_checkpoint(directory: str | Path, *, tokenizer_vocab_size: int | None = GPT2_VOCAB_SIZE,
                     check_values: bool = True) -> CheckpointInfo:
    """Check that `directory` is a GPT-2 checkpoint GPT2.from_pretrained loads: config.json, the headers of the
    weight files (safetensors header, torch.save pickle through a restricted unpickler), then the values.

    Returns a CheckpointInfo; raises CheckpointError saying the first problem found, e.g.
    ``"config.json: add_cross_attention=true is not supported"`` or
    ``"model-00002-of-00003.safetensors: tensor h.0.attn.c_attn.weight has shape [8, 16], expected [8, 24]"``.

    `tokenizer_vocab_size`: the vocabulary of the tokenizer the model will be used with (GPT-2's 50,257 by
    default); a model with fewer token embeddings could not read every token it writes. None: no such check (a
    model with a tokenizer of its own). A larger vocabulary is fine: generation never samples the extra ids.

    `check_values`: also read every weight and refuse a tensor holding NaN or an infinity (a model that cannot
    compute anything); this reads the whole checkpoint once (numpy on the raw bits, still no torch).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError("checkpoint is not a directory")
    config = _read_config(folder)
    fields_ = _config_fields(config, tokenizer_vocab_size)
    layout, tensors = _read_weights(folder)
    info = _match_tensors(config, fields_, layout, tensors)
    if check_values:
        found = first_non_finite(folder, info)
        if found is not None:
            raise CheckpointError(f"{found[0]}: tensor {found[1]} holds NaN or infinite values; the model cannot "
                                  "compute anything with it")
    return info
