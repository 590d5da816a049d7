"""Reading and writing Hugging Face format GPT-2 checkpoints (config.json + safetensors or pytorch_model.bin weights,
single-file or sharded).

Loading first runs the torch-free :func:`gpt2core.checkpoint.check_checkpoint`, which reads only config.json and
the weight files' headers, then reads exactly the tensors it listed. Error messages name files relative to the
checkpoint folder, never its path.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import CheckpointError, CheckpointInfo, check_checkpoint, normalise_key
from .config import GPT2_VOCAB_SIZE, GPT2Config

if TYPE_CHECKING:
    from .model import GPT2

__all__ = ["CheckpointError", "config_from_checkpoint", "load_pretrained", "save_pretrained"]

# transformers' GPT-2 stores these projections as Conv1D, whose weight ([in, out]) is the transpose of nn.Linear's.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
OS_ERROR = re.compile(r"\(os error (\d+)\)")


def config_from_checkpoint(info: CheckpointInfo) -> GPT2Config:
    """Our GPT2Config for a checked checkpoint (dropout from config.json's resid_pdrop, as transformers uses it)."""
    return GPT2Config(
        n_layer=info.n_layer,
        n_head=info.n_head,
        n_embd=info.n_embd,
        block_size=info.n_positions,
        vocab_size=info.vocab_size,
        n_inner=info.n_inner,
        dropout=float(info.config.get("resid_pdrop", 0.1)),
        layer_norm_epsilon=info.layer_norm_epsilon,
    )


def load_pretrained(cls: type["GPT2"], path: str | Path, *, tokenizer_vocab_size: int | None = GPT2_VOCAB_SIZE,
                    **overrides: Any) -> "GPT2":
    """A float32 GPT2 with the weights of the checkpoint folder `path` (F16/BF16/F64 weights are cast).

    `overrides` replace GPT2Config fields (dropout, pad_vocab_multiple, ...); ones that change tensor shapes make
    the checkpoint not fit. Raises CheckpointError (see check_checkpoint) for anything that is not a loadable
    GPT-2 checkpoint; `tokenizer_vocab_size` as there (None for a model with a tokenizer of its own).
    """
    directory = Path(path)
    info = check_checkpoint(directory, tokenizer_vocab_size=tokenizer_vocab_size)
    config = config_from_checkpoint(info)
    if overrides:
        config = GPT2Config.from_dict({**config.to_dict(), **overrides})
    model = _uninitialised(cls, config)
    params = {normalise_key(k): p for k, p in model.state_dict().items() if k != "lm_head.weight"}
    missing = [name for name in params if name not in info.tensors]
    if missing:
        raise CheckpointError(f"with these overrides the model needs tensor {missing[0]}, which the checkpoint lacks")
    extra = [name for name in info.tensors if name not in params]
    if extra:
        raise CheckpointError(f"with these overrides the model has no tensor {extra[0]}, which the checkpoint holds")

    by_file: dict[str, list[str]] = {}
    for name, (_dtype, _shape, file) in info.tensors.items():
        by_file.setdefault(file, []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            tensors = _read_tensors(directory, file, names)
            for name in names:
                _copy_into(params[name], name, tensors.pop(name), file, config)
    return model


def _uninitialised(cls: type["GPT2"], config: GPT2Config) -> "GPT2":
    """The model with allocated but unset parameters: every one is then overwritten from the checkpoint, so the
    random initialisation (most of a load's time for gpt2-sized models) is skipped."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty allocates each module's parameters anew
    return model


def _read_tensors(directory: Path, file: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` (normalised) of one weight file, as stored (any dtype)."""
    wanted = set(names)
    try:
        if file.endswith(".safetensors"):
            with safe_open(str(directory / file), framework="pt", device="cpu") as f:
                keys = {normalise_key(k): k for k in f.keys()}
                return {name: f.get_tensor(keys[name]) for name in names}
        state = torch.load(directory / file, map_location="cpu", weights_only=True, mmap=True)
        return {normalise_key(k): v for k, v in state.items() if normalise_key(k) in wanted}
    except Exception as exc:  # a file changed or corrupted since the check surfaces as many exception types
        message = str(exc)
        for folder in {str(directory), str(directory.resolve()), str(directory.absolute())}:
            message = message.replace(folder, "")
        raise CheckpointError(f"{file}: cannot read weights: {message}") from exc


def _copy_into(param: torch.Tensor, name: str, tensor: torch.Tensor, file: str, config: GPT2Config) -> None:
    if name.endswith(CONV1D_SUFFIXES):
        tensor = tensor.t()
    # The token embedding may have padding rows (pad_vocab_multiple) beyond the checkpoint's vocab_size.
    rows = config.vocab_size if name == "wte.weight" else param.shape[0]
    expected = (rows, *param.shape[1:])
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{file}: tensor {name} has shape {list(tensor.shape)}, but the model (with these overrides) "
            f"needs {list(expected)}"
        )
    param[:rows].copy_(tensor.to(param.dtype))
    param[rows:].zero_()


def save_pretrained(model: "GPT2", path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write config.json and model.safetensors for `model`; `state_dict` (GPT2's keys) replaces its own weights
    (gpt2core.lora writes a LoRA model's merged weights so, without merging the model itself)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    for key, value in (model.state_dict() if state_dict is None else state_dict).items():
        if key == "lm_head.weight":
            continue
        tensor = value.detach().to("cpu", torch.float32)
        if key == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        tensors[key] = tensor.contiguous()
    try:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    except Exception as exc:  # safetensors reports a failed write as text: "... I/O error: ... (os error 28)"
        found = OS_ERROR.search(str(exc))
        if found is None:
            raise
        number = int(found.group(1))
        raise OSError(number, os.strerror(number), "model.safetensors") from exc
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
