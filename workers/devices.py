"""The devices a worker runs jobs on: how many one job may use at once, and of what type.

Detected once, in a child interpreter (initialising CUDA in the worker's main process would break CUDA in the pool
processes it forks later): CUDA's device count (within CUDA_VISIBLE_DEVICES) on a GPU machine, else one CPU
process. The WORKER_DEVICES setting overrides the count: on a GPU machine it may only lower it (a worker cannot run
a job on GPUs it does not see: refused at start); without a GPU it is the number of training processes a job runs
(gloo), which makes sense up to the machine's cores.

The worker's main process detects at start (workers.app) and leaves the result in its environment
(WORKER_DEVICES, WORKER_DEVICE_TYPE), so its pool processes read it without a second probe.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from jobs.settings import Settings

_PROBE = """
import torch
if torch.cuda.is_available():
    n = torch.cuda.device_count()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
    print(f"cuda {n} cuda ({n} GPU(s): {names}; torch {torch.__version__})")
else:
    print(f"cpu 1 cpu (no CUDA device visible; torch {torch.__version__})")
"""

#: Where the main process leaves the detected type for its pool processes (the count goes to WORKER_DEVICES).
TYPE_VARIABLE = "WORKER_DEVICE_TYPE"


@dataclass(frozen=True)
class WorkerDevices:
    count: int  # devices one job may run on at once
    type: str  # "cuda" or "cpu"
    description: str  # for the start-up log, e.g. "cuda (2 GPU(s): NVIDIA H100 80GB HBM3, ...; torch 2.13.0)"

    @property
    def backend(self) -> str:
        """torch.distributed's backend for a job on these devices: NCCL between GPUs, gloo between CPU processes."""
        return "nccl" if self.type == "cuda" else "gloo"


def probe(timeout: float = 120.0) -> WorkerDevices:
    """What torch sees, asked in a child interpreter; never raises (a missing or broken torch is one CPU, and the
    description says why)."""
    try:
        run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return WorkerDevices(1, "cpu", f"unknown (device probe failed: {exc})")
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return WorkerDevices(1, "cpu", f"unknown (torch not usable: {last})")
    kind, count, description = run.stdout.strip().split(" ", 2)
    return WorkerDevices(int(count), kind, description)


def resolve(settings: Settings, found: WorkerDevices) -> WorkerDevices:
    """`found` with WORKER_DEVICES applied; ValueError when it asks for more GPUs than the worker sees."""
    wanted = settings.worker_devices
    if wanted is None:
        return found
    if found.type == "cuda" and wanted > found.count:
        raise ValueError(f"WORKER_DEVICES={wanted}, but this worker sees {found.count} GPU(s) ({found.description}); "
                         "set it to at most that, or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    return WorkerDevices(wanted, found.type, found.description)


_detected: WorkerDevices | None = None


def worker_devices(settings: Settings | None = None) -> WorkerDevices:
    """This worker's devices: what the main process left in the environment, else detected now (once)."""
    global _detected
    if _detected is not None:
        return _detected
    settings = settings or Settings.from_env()
    kind = os.environ.get(TYPE_VARIABLE)
    if kind in ("cuda", "cpu") and settings.worker_devices is not None:
        return WorkerDevices(settings.worker_devices, kind, kind)
    if _detected is None:
        _detected = resolve(settings, probe())
    return _detected


def publish(devices: WorkerDevices) -> None:
    """Leave `devices` in this process's environment for the processes it starts (the pool's, torchrun's)."""
    os.environ["WORKER_DEVICES"] = str(devices.count)
    os.environ[TYPE_VARIABLE] = devices.type
