"""config.json: the GPT-2 configurations GPT2.from_pretrained runs (transformers' defaults filled in)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config import GPT2_VOCAB_SIZE
from .common import (
    ACTIVATIONS,
    CONFIG_DEFAULTS,
    CONFIG_FILE,
    FIXED_FLAGS,
    MAX_CONFIG_BYTES,
    CheckpointError,
    _json_value,
)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"missing {CONFIG_FILE}")
    data = _read_json(path, CONFIG_FILE, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise CheckpointError(f"{CONFIG_FILE}: expected a JSON object")
    return data


def _read_json(path: Path, name: str, limit: int) -> Any:
    raw = _read_small_file(path, name, limit)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{name}: not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{name}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise CheckpointError(f"{name}: not valid JSON: nested too deeply") from None
    except ValueError:  # an integer of over 4300 digits
        raise CheckpointError(f"{name}: not valid JSON: a number is too large") from None


def _read_small_file(path: Path, name: str, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > limit:
        raise CheckpointError(f"{name}: larger than {limit:,} bytes")
    return raw


def _config_fields(config: dict[str, Any], tokenizer_vocab_size: int | None = GPT2_VOCAB_SIZE) -> dict[str, Any]:
    """The model-defining fields of config.json, defaults filled in; CheckpointError for unsupported values."""

    def refuse(message: str) -> CheckpointError:
        return CheckpointError(f"{CONFIG_FILE}: {message}")

    if config.get("model_type") != "gpt2":
        model_type = config.get("model_type")
        shown = repr(model_type)[:40] if isinstance(model_type, str) else _json_value(model_type)
        raise refuse(f"model_type is {shown}, expected 'gpt2'")
    out: dict[str, Any] = {}
    for name, default in CONFIG_DEFAULTS.items():
        value = config.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise refuse(f"{name} must be a positive integer, got {_json_value(value)}")
        out[name] = value
    n_inner = config.get("n_inner")
    if n_inner is not None and (not isinstance(n_inner, int) or isinstance(n_inner, bool) or n_inner < 1):
        raise refuse(f"n_inner must be a positive integer or null, got {_json_value(n_inner)}")
    out["n_inner"] = n_inner
    if out["n_embd"] % out["n_head"]:
        raise refuse(f"n_embd ({out['n_embd']}) must be divisible by n_head ({out['n_head']})")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise refuse(f"layer_norm_epsilon must be a positive number, got {_json_value(eps)}")
    out["layer_norm_epsilon"] = float(eps)
    dropout = config.get("resid_pdrop", 0.1)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise refuse(f"resid_pdrop must be a number in [0, 1), got {_json_value(dropout)}")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise refuse(f"activation_function {_json_value(activation)} is not supported (GPT-2 uses \"gelu_new\")")
    for flag, expected in FIXED_FLAGS:
        value = config.get(flag, expected)
        if value is not expected:
            raise refuse(
                f"{flag}={_json_value(value)} is not supported (GPT-2 uses {_json_value(expected)})"
            )
    if tokenizer_vocab_size is not None and out["vocab_size"] < tokenizer_vocab_size:
        raise refuse(
            f"vocab_size is {out['vocab_size']:,}, but GPT-2's tokenizer has {tokenizer_vocab_size:,} tokens; "
            f"the model needs vocab_size >= {tokenizer_vocab_size} (a larger one, with added tokens, is fine)"
        )
    return out
