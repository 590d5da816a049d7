"""A worker's devices (workers.devices) and what the worker decides from them (workers.convert.compiles)."""
from __future__ import annotations

import pytest

from jobs.settings import Settings
from workers.convert import COMPILE_MIN_STEPS, compiles
from workers.devices import WorkerDevices, probe, resolve

GPUS = WorkerDevices(2, "cuda", "cuda (2 GPU(s): NVIDIA H100 80GB HBM3, NVIDIA H100 80GB HBM3; torch 2.13.0)")
CPU = WorkerDevices(1, "cpu", "cpu (no CUDA device visible)")


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


def test_this_machine_is_probed_as_one_cpu_process():
    found = probe()
    assert (found.count, found.type, found.backend) == (1, "cpu", "gloo") and "torch" in found.description


def test_worker_devices_sets_the_count_within_the_gpus_the_worker_sees():
    assert resolve(settings(), GPUS) == GPUS and GPUS.backend == "nccl"
    assert resolve(settings(WORKER_DEVICES="1"), GPUS).count == 1
    with pytest.raises(ValueError, match="WORKER_DEVICES=4, but this worker sees 2 GPU"):
        resolve(settings(WORKER_DEVICES="4"), GPUS)
    assert resolve(settings(WORKER_DEVICES="4"), CPU) == WorkerDevices(4, "cpu", CPU.description)


@pytest.mark.parametrize("device, steps, lora, compiled", [
    ("cuda", COMPILE_MIN_STEPS, False, True), ("cuda", COMPILE_MIN_STEPS - 1, False, False),
    ("cuda", 10_000, True, False), ("cpu", 10_000, False, False)])
def test_long_cuda_runs_are_compiled(device, steps, lora, compiled):
    assert compiles(device, steps, lora) is compiled


def test_a_worker_takes_jobs_on_as_many_devices_as_its_queues_allow():
    from workers.sweeper import takes_devices

    assert takes_devices(2, None) == 2  # not ready yet: its devices
    assert takes_devices(2, ["generate", "train", "train-2"]) == 2
    assert takes_devices(2, ["generate", "train"]) == 1  # --queues train,generate on a two-device worker
    assert takes_devices(4, ["train-3", "generate"]) == 3
    assert takes_devices(2, ["generate"]) == 0
