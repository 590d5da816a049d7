"""How large a micro-batch fits on a CUDA device: probed with real training passes, not estimated."""
from __future__ import annotations

import torch

from .model import GPT2

#: The share of the device's memory a probed micro-batch may use at its peak (the rest absorbs fragmentation
#: and what the run allocates besides: the data's pinned buffers, evaluation, samples).
MEMORY_HEADROOM = 0.85


def largest_micro_batch(model: GPT2, block_size: int, limit: int, device: torch.device,
                        dtype: torch.dtype | None = torch.bfloat16) -> int:
    """The largest power-of-two micro-batch (windows of `block_size` tokens), at most `limit` (rounded down to a
    power of two), whose forward and backward pass under `dtype` autocast, plus AdamW's two fp32 state tensors
    per trainable parameter, peaks below MEMORY_HEADROOM of `device`'s memory; at least 1.

    CUDA only (ValueError otherwise). The model is moved to `device` and its gradients are cleared afterwards;
    its weights are not changed."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"largest_micro_batch probes CUDA devices, not {device}")
    model = model.to(device)
    total = torch.cuda.get_device_properties(device).total_memory
    optimizer_state = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    batch = 1 << (max(limit, 1).bit_length() - 1)
    was_training = model.training
    model.train()
    try:
        while batch > 1:
            if _fits(model, batch, block_size, device, dtype, total - optimizer_state):
                return batch
            batch //= 2
        return 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.cuda.empty_cache()


def _fits(model: GPT2, batch: int, block_size: int, device: torch.device, dtype: torch.dtype | None,
          budget: int) -> bool:
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        x = torch.randint(0, model.config.vocab_size, (batch, block_size), device=device)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            _, loss = model(x, x)
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) <= MEMORY_HEADROOM * budget
    except torch.cuda.OutOfMemoryError:
        return False
