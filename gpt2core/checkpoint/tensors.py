"""Matching a checkpoint's tensors against its config: every tensor GPT-2 needs, with its shape and a float dtype."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .common import (
    IGNORED_PREFIXES,
    IGNORED_SUFFIXES,
    LAYER_NAME,
    LAYER_TENSORS,
    LOADABLE_DTYPES,
    CheckpointError,
    CheckpointInfo,
    _shape_text,
    normalise_key,
)

def _expected_shape(name: str, f: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape GPT-2 with config fields `f` needs for normalised tensor `name`, or None if it is not one."""
    C, V, P = f["n_embd"], f["vocab_size"], f["n_positions"]
    I = f["n_inner"] or 4 * C  # noqa: E741
    if name == "wte.weight":
        return (V, C)
    if name == "wpe.weight":
        return (P, C)
    if name in ("ln_f.weight", "ln_f.bias"):
        return (C,)
    match = LAYER_NAME.fullmatch(name)
    if not match or int(match[1]) >= f["n_layer"]:
        return None
    return {
        "ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "mlp.c_fc.weight": (C, I), "mlp.c_fc.bias": (I,),
        "mlp.c_proj.weight": (I, C), "mlp.c_proj.bias": (C,),
    }.get(match[2])  # fmt: skip


def _expected_names(n_layer: int) -> Iterator[str]:
    yield "wte.weight"
    yield "wpe.weight"
    for i in range(n_layer):
        for suffix in LAYER_TENSORS:
            yield f"h.{i}.{suffix}"
    yield "ln_f.weight"
    yield "ln_f.bias"


def _is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES) or name == "lm_head.weight" or name.startswith(IGNORED_PREFIXES)


def parameter_count(f: dict[str, Any]) -> int:
    """GPT-2's parameters for config fields `f` (n_embd, n_layer, vocab_size, n_positions, n_inner optional), the
    tied token embedding counted once: the gpt2 preset has 124,439,808."""
    C, L = f["n_embd"], f["n_layer"]
    I = f.get("n_inner") or 4 * C  # noqa: E741
    per_layer = 4 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * I + I) + (I * C + C)
    return f["vocab_size"] * C + f["n_positions"] * C + L * per_layer + 2 * C


def _match_tensors(
    config: dict[str, Any], f: dict[str, Any], layout: str, stored: list[tuple[str, str, tuple[int, ...], str]]
) -> CheckpointInfo:
    present: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for key, dtype, shape, file in stored:
        name = normalise_key(key)
        if name in present:
            other = present[name][2]
            raise CheckpointError(
                f"{file}: tensor {name} appears twice (also in {other}, with or without the 'transformer.' prefix)"
            )
        present[name] = (dtype, shape, file)
    used = {name for name in present if _expected_shape(name, f) is not None}
    expected_count = 4 + len(LAYER_TENSORS) * f["n_layer"]
    if len(used) < expected_count:
        # The first missing name lies within the first len(used) + 1 expected names, so this loop stays short
        # whatever n_layer says.
        first = next(name for name in _expected_names(f["n_layer"]) if name not in used)
        missing = expected_count - len(used)
        more = f" (and {missing - 1} more)" if missing > 1 else ""
        hint = ""
        layer = LAYER_NAME.fullmatch(first)
        if layer and int(layer[1]) > 0 and not any(name.startswith(f"h.{layer[1]}.") for name in present):
            hint = f"; config.json has n_layer={f['n_layer']} but the checkpoint holds {layer[1]} layers?"
        raise CheckpointError(f"{layout}: checkpoint lacks tensor {first}{more}{hint}")
    ignored = []
    for name, (_dtype, shape, file) in sorted(present.items()):
        if name in used:
            continue
        if not _is_ignored(name):
            hint = ""
            layer = LAYER_NAME.fullmatch(name)
            if layer and int(layer[1]) >= f["n_layer"]:
                hint = f" (config.json has n_layer={f['n_layer']})"
            raise CheckpointError(f"{file}: unexpected tensor {name}{hint}; it is not part of GPT-2")
        if name == "lm_head.weight" and shape != (f["vocab_size"], f["n_embd"]):
            raise CheckpointError(
                f"{file}: tensor lm_head.weight has shape {_shape_text(shape)}, expected "
                f"{_shape_text((f['vocab_size'], f['n_embd']))} (it is tied to wte.weight)"
            )
        ignored.append(name)
    tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for name in _expected_names(f["n_layer"]):
        dtype, shape, file = present[name]
        expected = _expected_shape(name, f)
        assert expected is not None  # every expected name has a shape
        if dtype not in LOADABLE_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {name} has dtype {dtype}; weights must be {', '.join(LOADABLE_DTYPES[:-1])} "
                f"or {LOADABLE_DTYPES[-1]}"
            )
        if shape != expected:
            message = f"{file}: tensor {name} has shape {_shape_text(shape)}, expected {_shape_text(expected)}"
            if name in ("wte.weight", "wpe.weight") and len(shape) == 2 and shape[1] == f["n_embd"]:
                field_ = "vocab_size" if name == "wte.weight" else "n_positions"
                message += f": it has {shape[0]:,} rows but config.json {field_} is {expected[0]:,}"
            raise CheckpointError(message)
        tensors[name] = (dtype, shape, file)
    return CheckpointInfo(
        config=config,
        n_layer=f["n_layer"],
        n_head=f["n_head"],
        n_embd=f["n_embd"],
        n_positions=f["n_positions"],
        vocab_size=f["vocab_size"],
        n_inner=f["n_inner"],
        layer_norm_epsilon=f["layer_norm_epsilon"],
        parameter_count=parameter_count(f),
        tensors=tensors,
        ignored=ignored,
    )
