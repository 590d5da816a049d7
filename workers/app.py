"""The workers' Celery app, wired by ``jobs.queue.make_celery``, and its start-up log."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings

from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from jobs.queue import make_celery
from jobs.settings import Settings

log = logging.getLogger("workers")

settings = Settings.from_env()
app = make_celery(settings, main="workers")

#: The signal the worker's main process sends its pool processes when it shuts down: each sets SHUTTING_DOWN.
HAND_BACK_SIGNAL = signal.SIGUSR2

# jobs.queue keeps tasks running across a broker connection loss on purpose (their database leases guard them).
warnings.filterwarnings("ignore", message=".*cancel_long_running_tasks_on_connection_loss.*")


_DEVICE_PROBE = """
import torch
if torch.cuda.is_available():
    n = torch.cuda.device_count()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
    print(f"cuda ({n} GPU(s): {names}; torch {torch.__version__})")
else:
    print(f"cpu (no CUDA device visible; torch {torch.__version__})")
"""


def describe_device(timeout: float = 120.0) -> str:
    """The compute device jobs will run on, e.g. "cuda (1 GPU(s): NVIDIA H100; torch 2.13.0)" or "cpu (...)".

    Probed in a child interpreter: initialising CUDA in the worker's main process would break CUDA in the
    pool processes it forks later. Never raises: a missing or broken torch is reported, not fatal.
    """
    try:
        probe = subprocess.run([sys.executable, "-c", _DEVICE_PROBE], capture_output=True, text=True,
                               timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (device probe failed: {exc})"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"unknown (torch not usable: {last})"
    return probe.stdout.strip()


@worker_ready.connect
def _log_start(sender=None, **_kwargs) -> None:
    queues = "unknown"
    try:
        queues = ", ".join(sorted(q.name for q in sender.app.amqp.queues.consume_from.values()))
    except Exception:
        pass
    device = describe_device()
    forced = os.environ.get("GPT2CORE_DEVICE")
    if forced:
        device += f"; GPT2CORE_DEVICE={forced} overrides it for jobs"
    log.info("worker ready: device %s; consuming queues: %s; broker %s",
             device, queues, sender.app.connection_for_read().as_uri())
    from workers.runtime import runtime
    from workers.sweeper import start_sweeper

    global _pool
    _pool = getattr(sender, "pool", None)
    start_sweeper(runtime())


_pool = None  # the worker's task pool (set when it is ready), whose processes run the jobs


def _pool_pids() -> list[int]:
    processes = getattr(getattr(_pool, "_pool", None), "_pool", None) or []
    return [p.pid for p in processes if getattr(p, "pid", None)]


@worker_shutting_down.connect
def _hand_back_jobs(sig=None, how=None, **_kwargs) -> None:
    """A warm shutdown (SIGTERM: a deploy, `docker compose restart`) must not make a running job wait out its
    lease: tell every process running jobs to checkpoint and hand its job back at once (workers.runtime)."""
    from workers.runtime import SHUTTING_DOWN

    SHUTTING_DOWN.set()  # the solo pool runs jobs in this process
    for pid in _pool_pids():
        try:
            os.kill(pid, HAND_BACK_SIGNAL)
        except ProcessLookupError:
            pass


@worker_process_init.connect
def _warm_up(**_kwargs) -> None:
    """Each pool process connects and loads the tokenizer before its first task, not during it."""
    from workers.generation import tokenizer
    from workers.runtime import SHUTTING_DOWN, runtime

    signal.signal(HAND_BACK_SIGNAL, lambda _signum, _frame: SHUTTING_DOWN.set())
    runtime()
    tokenizer()
