"""Data-parallel training with torch.distributed: one process per device, each with the whole model (DDP).

    # train.py, launched with: torchrun --nproc_per_node 2 train.py
    from gpt2core.distributed import init_distributed, shutdown_distributed
    ctx = init_distributed()                    # reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    trainer = Trainer(model, config, tokens)    # sees the process group: wraps the model in DDP
    trainer.fit()
    shutdown_distributed()

Started without torchrun (no ``WORLD_SIZE``, or 1), ``init_distributed`` initializes nothing and returns the
single-process context, so the same script runs as one process.

How :class:`gpt2core.train.Trainer` uses a group of ``N`` processes (ranks): every rank draws the same batches a
single process would, concatenates them into the step's global batch of ``W = batch_size * grad_accum_steps``
windows and trains on its own contiguous ``W / N`` of them (:func:`split_global_batch`, :func:`shard_batches`);
DDP averages the gradients over the ranks. The helpers below are the few collectives the Trainer needs; each
is a no-op (no communication) when torch.distributed is not initialized or the world size is 1.

CPU processes communicate with the "gloo" backend, CUDA processes (one GPU each, ``cuda:LOCAL_RANK``) with
"nccl". Collectives block until every rank of the group takes part: every rank must call them in the same order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .device import default_device, set_default_device

__all__ = [
    "DistributedContext",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "data_parallel",
    "gather_to_main",
    "init_distributed",
    "rank_seed",
    "shard_batches",
    "shutdown_distributed",
    "split_global_batch",
]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in its process group.

    ``rank``: 0 .. world_size - 1, unique across the group. ``world_size``: the number of processes.
    ``local_rank``: the rank among this machine's processes (which GPU it uses). ``device``: the device its
    collectives' tensors live on (``cuda:local_rank`` with nccl, else cpu)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that calls callbacks and writes checkpoints."""
        return self.rank == 0

    @classmethod
    def current(cls) -> "DistributedContext":
        """The context of the initialized default process group (rank and world size from torch.distributed,
        local_rank from the environment's ``LOCAL_RANK``, default 0; device ``cuda:local_rank`` when the backend
        is nccl, else cpu), or the single-process context ``(0, 1, 0, default_device())`` when torch.distributed
        is not initialized."""
        if not _initialized():
            return cls(rank=0, world_size=1, local_rank=0, device=default_device())
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", local_rank) if nccl else torch.device("cpu")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def init_distributed(device_type: str | None = None) -> DistributedContext:
    """Join the process group of a process started by torchrun; returns this process's context.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. ``device_type``:
    "cuda" or "cpu"; default the type of ``GPT2CORE_DEVICE`` when set (see gpt2core.device), else "cuda" when
    CUDA is available, else "cpu". On CUDA the process uses GPU ``LOCAL_RANK`` (``torch.cuda.set_device``) and
    the nccl backend; on CPU gloo. The rank's device also becomes gpt2core's default device
    (``set_default_device``), so a Trainer built afterwards runs on it.

    Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing is initialized and the single-process
    context is returned. Calling it again once the group is initialized returns the current context.
    ValueError for an unknown device type; torch.distributed's errors (e.g. a timeout reaching MASTER_ADDR)
    propagate."""
    if _initialized():
        return DistributedContext.current()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext.current()
    if device_type is None:
        requested = os.environ.get("GPT2CORE_DEVICE")
        device_type = torch.device(requested).type if requested else "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"init_distributed: device_type must be 'cuda' or 'cpu', got {device_type!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    set_default_device(device)
    return DistributedContext.current()


def shutdown_distributed() -> None:
    """Leave (destroy) the default process group, if one is initialized."""
    if _initialized():
        dist.destroy_process_group()


# ---- splitting a step's batch across ranks ----------------------------------------------------------------------


def split_global_batch(batch_size: int, grad_accum_steps: int, world_size: int) -> tuple[int, int]:
    """How one rank trains its share of a step: ``(micro_batch, accum)``, in windows and micro-batches.

    A step's global batch is ``W = batch_size * grad_accum_steps`` windows; each rank takes ``P = W / world_size``
    of them, in ``accum`` micro-batches of ``micro_batch`` windows: ``micro_batch`` is the largest divisor of
    ``P`` that is at most ``batch_size`` (so a micro-batch never holds more than a single process's), and
    ``micro_batch * accum == P``. E.g. (8, 1, 2) -> (4, 1); (3, 2, 2) -> (3, 1); (4, 3, 2) -> (3, 2).
    ValueError when an argument is not a positive integer, or when ``batch_size * grad_accum_steps`` is not a
    multiple of ``world_size``."""
    for name, value in (("batch_size", batch_size), ("grad_accum_steps", grad_accum_steps),
                        ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    windows = batch_size * grad_accum_steps
    if windows % world_size:
        raise ValueError(f"batch_size * grad_accum_steps ({batch_size} * {grad_accum_steps} = {windows} windows "
                         f"per step) must be a multiple of the world size ({world_size}): every rank takes an "
                         "equal share")
    per_rank = windows // world_size
    micro_batch = max(d for d in range(1, min(batch_size, per_rank) + 1) if per_rank % d == 0)
    return micro_batch, per_rank // micro_batch


def shard_batches(batches: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                  ctx: DistributedContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of a step: ``batches`` (the ``grad_accum_steps`` loader batches of
    ``batch_size`` windows each, every ``(x, y)`` of shape (B, T)) concatenated into the global batch of W
    windows, of which this rank takes the contiguous slice ``[rank * W / N, (rank + 1) * W / N)``, cut into
    micro-batches per :func:`split_global_batch`. Returns ``batches`` itself for a world size of 1.
    ValueError when W is not a multiple of the world size."""
    if ctx.world_size == 1:
        return batches
    micro, accum = split_global_batch(batch_size, len(batches), ctx.world_size)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    if len(x) != batch_size * len(batches):
        raise ValueError(f"the loader's batches hold {len(x)} windows, not batch_size * grad_accum_steps "
                         f"({batch_size} * {len(batches)})")
    first = ctx.rank * micro * accum
    return [(x[s : s + micro], y[s : s + micro]) for s in range(first, first + micro * accum, micro)]


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for rank ``rank`` resuming at optimizer step ``step`` of a run seeded with ``seed``: an integer in
    [0, 2**63) derived from ``(seed + rank, step)`` (numpy's SeedSequence), different for every rank and step."""
    entropy = [(seed + rank) % 2**64, step]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---- collectives (no-ops on a single process) -------------------------------------------------------------------


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank, in place (every rank then holds the same sum); returns it. The tensor
    may live on any device: it is moved to the group's device for the collective. Unchanged on one process."""
    ctx = DistributedContext.current()
    if ctx.world_size == 1:
        return tensor
    if tensor.device == ctx.device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    else:
        moved = tensor.to(ctx.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (one tiny all-reduce). To share a decision made
    by rank 0 alone, pass ``ctx.is_main and decision``. ``flag`` itself on one process."""
    ctx = DistributedContext.current()
    if ctx.world_size == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's picklable ``obj`` gathered on rank 0: the list ``[obj of rank 0, obj of rank 1, ...]`` there,
    None on the other ranks. ``[obj]`` on one process."""
    ctx = DistributedContext.current()
    if ctx.world_size == 1:
        return [obj]
    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier() -> None:
    """Wait until every rank gets here. Nothing on one process."""
    if DistributedContext.current().world_size > 1:
        dist.barrier()


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``model`` (already on ``device``) wrapped in DistributedDataParallel for training: its construction
    broadcasts rank 0's parameters to every rank (a collective), and each backward averages the gradients of the
    parameters that require grad over the ranks (for a LoRA model only the adapters'). On CUDA the module's
    device is ``device`` (the current CUDA device when it has no index). GPT2 has no buffers, so a forward
    through the wrapper syncs nothing (evaluations run on the unwrapped model)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=device_ids)
