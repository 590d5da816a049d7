"""LoRA fine-tuning of gpt2core's GPT2 with Hugging Face peft (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

    model = GPT2.from_pretrained("models/base")
    lora = apply_lora(model, LoraSettings(rank=8, alpha=16))     # peft.get_peft_model: only the adapters train
    Trainer(lora, TrainConfig(...), tokens).fit()                 # the Trainer as for full fine-tuning
    merged = merge_lora(lora)                                     # a plain GPT2, the adapters folded in
    merged.save_pretrained("models/tuned")                        # a GPT-2 checkpoint transformers loads

Each targeted ``nn.Linear`` ``W`` (``out x in``) gets peft's LoRA layer: ``y = W x + (alpha / rank) * B A dropout(x)``
with ``A`` (``rank x in``, Kaiming-uniform) and ``B`` (``out x rank``, zeros), so the wrapped model starts out
computing exactly what the base model does. Every base weight is frozen. The wrapped model is a
``peft.PeftModel`` around the GPT2 (whose layers peft replaced in place): it keeps gpt2core's calling convention,
``model(idx, targets)`` returns ``(logits, loss)``, and forwards GPT2's attributes (``config``,
``hidden_states``, ...), so ``Trainer``, ``generate`` and ``evaluate`` take it as they take a GPT2.

Checkpoints (``Trainer.save_checkpoint`` on a wrapped model; see :func:`save_lora_checkpoint`): the step folder's
``config.json`` + ``model.safetensors`` hold the *merged* weights, a plain GPT-2 checkpoint
(``GPT2.from_pretrained`` and transformers load it), and ``adapter/`` is peft's adapter folder
(``adapter_model.safetensors``, ``adapter_config.json``; ``peft.PeftModel.from_pretrained(base, "step-N/adapter")``
loads it). ``Trainer.resume`` on a freshly wrapped base model loads the adapter, so the run continues exactly.
The adapter sits in a folder of its own because transformers' ``from_pretrained`` takes a folder holding
``adapter_config.json`` for an adapter and looks for its base model.

peft is imported only when a model is wrapped, merged or saved (it imports transformers: seconds).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .config import GPT2_LINEAR_MODULES, LORA_DEFAULT_TARGET_MODULES
from .model import GPT2

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = [
    "ADAPTER_DIR",
    "LoraSettings",
    "apply_lora",
    "is_lora",
    "linear_module_names",
    "load_adapter",
    "merge_lora",
    "merged_state_dict",
    "save_adapter",
    "save_lora_checkpoint",
    "save_merged",
    "settings_of",
    "trainable_parameters",
]

ADAPTER_DIR = "adapter"  # the adapter's folder inside a checkpoint folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # peft's name for a model's one adapter


@dataclass
class LoraSettings:
    """LoRA's hyperparameters. Invalid values raise ValueError naming the field (``LoraSettings.<name>``).

    ``rank``: the adapters' inner width r. ``alpha``: the update is scaled by ``alpha / rank`` (so with alpha
    fixed, changing the rank changes the update's size less; 2 x rank, the default 16 for 8, is the usual start).
    ``dropout``: on the adapters' input only. ``target_modules``: the Linear layers to adapt, by the names in
    ``gpt2core.config.GPT2_LINEAR_MODULES`` ("c_attn", "c_proj", "c_fc", or qualified as "attn.c_proj",
    "mlp.c_proj", ...). The default, every Linear layer of every block (c_attn, both c_proj, c_fc), follows QLoRA
    (Dettmers et al. 2023), who found that adapting all of them, not just attention (peft's GPT-2 default, c_attn
    alone), is what matches full fine-tuning; it trains about 1% of gpt2's parameters at rank 8.
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"LoraSettings.{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            fail("rank", "a positive integer")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            fail("alpha", "a number > 0")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            fail("dropout", "a number in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets:
            fail("target_modules", "a non-empty list of module names")
        for name in targets:
            if name not in GPT2_LINEAR_MODULES:
                raise ValueError(f"LoraSettings.target_modules: {name!r} is not a Linear layer of GPT-2; choose "
                                 f"from {', '.join(GPT2_LINEAR_MODULES)}")
        if len(set(targets)) != len(targets):
            fail("target_modules", "a list without repeated names")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.target_modules = tuple(targets)

    @property
    def scaling(self) -> float:
        """What the adapters' product B A is multiplied by: alpha / rank."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LoraSettings fields: {', '.join(sorted(unknown))}")
        return cls(**data)


def linear_module_names(model: nn.Module) -> tuple[str, ...]:
    """The names LoRA may target in `model` (a GPT2): each block Linear layer's own name ("c_proj") and its
    qualified name ("attn.c_proj"), in GPT2_LINEAR_MODULES' order. lm_head is left out: its weight is the token
    embedding's."""
    found: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head" and not name.endswith(".lm_head"):
            parts = name.split(".")
            found.update({parts[-1], ".".join(parts[-2:])})
    return tuple(sorted(found, key=lambda n: (GPT2_LINEAR_MODULES.index(n) if n in GPT2_LINEAR_MODULES else
                                                len(GPT2_LINEAR_MODULES), n)))


def apply_lora(model: GPT2, settings: LoraSettings | None = None, *, seed: int | None = None) -> "PeftModel":
    """`model` with peft's LoRA adapters on the `settings.target_modules` layers (peft.get_peft_model with a
    peft.LoraConfig); every base weight frozen, only the adapters trainable.

    peft replaces the targeted layers of `model` itself: use the returned model from then on. `seed` draws the
    adapters' initial A matrices from a generator seeded with it, leaving the global RNG as it was (None: from
    the global RNG), so a job that is run again starts from the same adapters."""
    import peft

    settings = settings or LoraSettings()
    if is_lora(model):
        raise ValueError("the model already has LoRA adapters")
    if not isinstance(model, GPT2):
        raise TypeError(f"apply_lora takes a gpt2core GPT2, got {type(model).__name__}")
    allowed = linear_module_names(model)
    for name in settings.target_modules:
        if name not in allowed:
            raise ValueError(f"LoraSettings.target_modules: {name!r} is not a Linear layer of this model; choose "
                             f"from {', '.join(allowed)}")
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft says int; any number works (alpha / r)
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    if seed is None:
        return peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)


def is_lora(model: Any) -> bool:
    """Whether `model` is a GPT2 wrapped by apply_lora (a peft.PeftModel with a LoRA adapter)."""
    peft = sys.modules.get("peft")
    if peft is None:  # no model can have been wrapped: peft was never imported
        return False
    if not isinstance(model, peft.PeftModel) or not isinstance(model.get_base_model(), GPT2):
        return False
    config = model.peft_config.get(ADAPTER_NAME)
    return isinstance(config, peft.LoraConfig)


def _require_lora(model: Any) -> None:
    if not is_lora(model):
        raise TypeError(f"expected a GPT2 wrapped by gpt2core.lora.apply_lora, got {type(model).__name__}")


def settings_of(model: "PeftModel") -> LoraSettings:
    """The LoraSettings `model` was wrapped with."""
    from peft import LoraConfig

    _require_lora(model)
    config = model.peft_config[ADAPTER_NAME]
    assert isinstance(config, LoraConfig)
    targets = config.target_modules or ()
    ordered = tuple(n for n in GPT2_LINEAR_MODULES if n in targets) if not isinstance(targets, str) else (targets,)
    return LoraSettings(rank=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=ordered)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a shared tensor (the tied embedding) counted once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _lora_layers(model: "PeftModel") -> dict[str, Any]:
    """The peft LoRA layers of the wrapped GPT2, by their name in GPT2."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: "PeftModel") -> dict[str, torch.Tensor]:
    """GPT2's state dict with the adapters merged (each adapted weight W + (alpha/rank) B A, computed as peft's
    merge does), without changing `model`: the merged weights are new CPU tensors, the others the model's own."""
    _require_lora(model)
    base = model.get_base_model()
    layers = _lora_layers(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach()
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight.detach()
        if not layer.merged and ADAPTER_NAME in layer.lora_A:
            weight = weight + layer.get_delta_weight(ADAPTER_NAME)
        state[f"{name}.weight"] = weight.to("cpu")
    return state


def save_merged(model: "PeftModel", path: str | Path) -> None:
    """Write the merged model (config.json + model.safetensors) to folder `path`: a plain GPT-2 checkpoint that
    GPT2.from_pretrained and transformers' GPT2LMHeadModel load. `model` itself is left as it was."""
    from .hf import save_pretrained

    _require_lora(model)
    base = model.get_base_model()
    assert isinstance(base, GPT2)
    save_pretrained(base, path, state_dict=merged_state_dict(model))


def merge_lora(model: "PeftModel") -> GPT2:
    """A plain GPT2 with the adapters merged into its weights (peft's merge_and_unload). This merges in place: the
    result is the wrapped model's own GPT2 with plain nn.Linear layers again, and `model` is spent. To keep
    training, save with save_merged instead."""
    _require_lora(model)
    merged = model.merge_and_unload()
    assert isinstance(merged, GPT2)
    merged.requires_grad_(True)  # peft froze the base weights; a plain GPT2 trains them all
    return merged


def save_adapter(model: "PeftModel", path: str | Path) -> None:
    """The adapter in peft's format into folder `path`: adapter_model.safetensors (the A and B matrices) and
    adapter_config.json. A failed write raises an OSError naming its errno (ENOSPC for a full disk)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    _require_lora(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    data = save(tensors, metadata={"format": "pt"})
    with open(directory / ADAPTER_WEIGHTS, "wb") as out:  # through Python's file, for the OSError
        out.write(data)
    config = model.peft_config[ADAPTER_NAME].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    with open(directory / ADAPTER_CONFIG, "w") as out:
        out.write(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def load_adapter(model: "PeftModel", path: str | Path) -> None:
    """Load the adapter weights save_adapter wrote into `model` (wrapped with the same settings)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    _require_lora(model)
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no LoRA adapter weights")
    saved = load_file(str(file), device="cpu")
    expected = get_peft_model_state_dict(model)
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not"
        raise ValueError(f"{file}: the adapter does not fit this model: it {what}")
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{file}: {key} has shape {list(tensor.shape)}, this model's is "
                             f"{list(expected[key].shape)}")
    set_peft_model_state_dict(model, saved, adapter_name=ADAPTER_NAME)


def save_lora_checkpoint(model: "PeftModel", path: str | Path) -> None:
    """A LoRA checkpoint's weights into folder `path`: the merged model (config.json + model.safetensors, a plain
    GPT-2 checkpoint) and the adapter in ``path/adapter/`` (peft's format)."""
    save_merged(model, path)
    save_adapter(model, Path(path) / ADAPTER_DIR)
