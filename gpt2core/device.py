"""Which device gpt2core runs on: CUDA when available, else CPU; chosen once, overridable.

Override with `set_default_device("cpu")` or the environment variable GPT2CORE_DEVICE.
"""
from __future__ import annotations

import os

import torch

_chosen: torch.device | None = None


def default_device() -> torch.device:
    global _chosen
    if _chosen is None:
        requested = os.environ.get("GPT2CORE_DEVICE")
        _chosen = torch.device(requested if requested else "cuda" if torch.cuda.is_available() else "cpu")
    return _chosen


def set_default_device(device: str | torch.device | None) -> None:
    """Pin the device (None goes back to the automatic choice on next use)."""
    global _chosen
    _chosen = torch.device(device) if device is not None else None
