"""Reading and writing Hugging Face format GPT-2 checkpoints (config.json + model.safetensors / pytorch_model.bin)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .config import GPT2Config

if TYPE_CHECKING:
    from .model import GPT2


class CheckpointError(ValueError):
    """A directory that is not a loadable GPT-2 checkpoint; the message says what is wrong."""


# transformers' GPT-2 stores these projections as Conv1D, whose weight is the transpose of nn.Linear's.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def config_from_hf(data: dict[str, Any], source: Path) -> GPT2Config:
    if data.get("model_type") != "gpt2":
        raise CheckpointError(f"{source}: model_type is {data.get('model_type')!r}, expected 'gpt2'")
    activation = data.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: activation_function {activation!r} is not supported (GPT-2 uses gelu_new)")
    for flag, expected in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("tie_word_embeddings", True),
    ):
        if data.get(flag, expected) != expected:
            raise CheckpointError(f"{source}: {flag}={data[flag]!r} is not supported (GPT-2 uses {expected!r})")
    try:
        return GPT2Config(
            n_layer=data.get("n_layer", 12),
            n_head=data.get("n_head", 12),
            n_embd=data.get("n_embd", 768),
            block_size=data.get("n_positions", 1024),
            vocab_size=data.get("vocab_size", 50257),
            n_inner=data.get("n_inner"),
            dropout=data.get("resid_pdrop", 0.1),
            layer_norm_epsilon=data.get("layer_norm_epsilon", 1e-5),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid GPT-2 config: {exc}") from exc


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        file = directory / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or truncated file surfaces as many exception types
            raise CheckpointError(f"{file}: cannot read weights: {exc}") from exc
    raise CheckpointError(f"{directory}: missing weights file (expected {' or '.join(WEIGHT_FILES)})")


def normalise_key(key: str) -> str:
    return key[len("transformer.") :] if key.startswith("transformer.") else key


def load_pretrained(cls: type["GPT2"], path: str | Path, **overrides: Any) -> "GPT2":
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: missing config.json")
    try:
        hf_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file}: not valid JSON: {exc}") from exc
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    config = config_from_hf(hf_config, config_file)
    if overrides:
        config = GPT2Config.from_dict({**config.to_dict(), **overrides})

    source = {
        normalise_key(k): v
        for k, v in read_state_dict(directory).items()
        if not k.endswith(IGNORED_SUFFIXES) and normalise_key(k) != "lm_head.weight"
    }
    model = cls(config)
    target = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    expected = {normalise_key(k) for k in target}
    missing = sorted(expected - set(source))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: checkpoint lacks tensor {missing[0]}{more}")
    unexpected = sorted(set(source) - expected)
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]} in checkpoint")

    with torch.no_grad():
        for key, param in target.items():
            tensor = source[normalise_key(key)]
            if key.endswith(CONV1D_SUFFIXES):
                tensor = tensor.t()
            if key == "transformer.wte.weight" and tensor.shape[0] == config.vocab_size:
                expected_shape = (config.vocab_size, *param.shape[1:])
            else:
                expected_shape = tuple(param.shape)
            if tuple(tensor.shape) != expected_shape:
                raise CheckpointError(
                    f"{directory}: tensor {normalise_key(key)} has shape {tuple(tensor.shape)}, "
                    f"expected {expected_shape} for this config"
                )
            param[: tensor.shape[0]].copy_(tensor)
            param[tensor.shape[0] :].zero_()
    return model


def save_pretrained(model: "GPT2", path: str | Path) -> None:
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensor = value.detach().to("cpu", torch.float32)
        if key == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        tensors[key] = tensor.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
