"""The workers' Celery app, wired by ``jobs.queue.make_celery``, and its start-up log."""
from __future__ import annotations

import logging
import os
import signal
import warnings

from celery.signals import celeryd_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from jobs.queue import make_celery
from jobs.settings import Settings

log = logging.getLogger("workers")

settings = Settings.from_env()
app = make_celery(settings, main="workers")

#: The signal the worker's main process sends its pool processes when it shuts down: each sets SHUTTING_DOWN.
HAND_BACK_SIGNAL = signal.SIGUSR2

# jobs.queue keeps tasks running across a broker connection loss on purpose (their database leases guard them).
warnings.filterwarnings("ignore", message=".*cancel_long_running_tasks_on_connection_loss.*")


@celeryd_init.connect
def _choose_queues(sender=None, instance=None, options=None, **_kwargs) -> None:
    """Before the worker consumes anything: find its devices (workers.devices; a WORKER_DEVICES it cannot honour
    stops it here) and, unless --queues names them, consume the queues of every job that fits them
    (jobs.queue.worker_queues: "train" ... "train-N" and "generate")."""
    from jobs.queue import worker_queues
    from workers.devices import publish, worker_devices

    try:
        devices = worker_devices(Settings.from_env())
    except ValueError as exc:  # a WORKER_DEVICES that cannot take effect: the worker does not start
        log.critical("%s", exc)
        raise SystemExit(f"worker not started: {exc}") from None
    publish(devices)  # the pool processes (and the training processes they start) read it from the environment
    if instance is not None and not (options or {}).get("queues"):
        instance.app.amqp.queues.select(worker_queues(devices.count))


@worker_ready.connect
def _log_start(sender=None, **_kwargs) -> None:
    queues = "unknown"
    try:
        queues = ", ".join(sorted(q.name for q in sender.app.amqp.queues.consume_from.values()))
    except Exception:
        pass
    from workers.devices import worker_devices

    devices = worker_devices()
    device = devices.description
    forced = os.environ.get("GPT2CORE_DEVICE")
    if forced:
        device += f"; GPT2CORE_DEVICE={forced} overrides it for jobs"
    log.info("worker ready: device %s; runs a job on up to %d device(s) (WORKER_DEVICES); consuming queues: %s; "
             "broker %s", device, devices.count, queues, sender.app.connection_for_read().as_uri())
    from workers.runtime import runtime
    from workers.sweeper import start_sweeper

    global _pool
    _pool = getattr(sender, "pool", None)
    from workers import sweeper

    try:
        sweeper.CONSUMED_QUEUES = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    except Exception:
        pass
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
    _forget_this_worker()
    for pid in _pool_pids():
        try:
            os.kill(pid, HAND_BACK_SIGNAL)
        except ProcessLookupError:
            pass


@worker_shutdown.connect
def _gone(**_kwargs) -> None:
    """Once more at the very end: a sweep that ran during the warm shutdown may have recorded this worker again."""
    _forget_this_worker()


def _forget_this_worker() -> None:
    """This worker no longer counts as live for placement (jobs.placement); best effort."""
    try:
        from jobs.placement import forget_worker
        from workers.runtime import runtime

        with runtime().transaction() as session:
            forget_worker(session, runtime().worker_id)
    except Exception:
        log.warning("could not remove this worker from the live workers", exc_info=True)


def listen_for_hand_back() -> None:
    """In a pool process: HAND_BACK_SIGNAL sets SHUTTING_DOWN (running work checkpoints and hands its job back).
    Installed again at the start of every task (workers.tasks.deliver): billiard installs its own exit handler for
    SIGUSR2 in pool processes after their initializer has run (billiard 4.3), which would end the process in the
    middle of a step instead."""
    import threading

    from workers.runtime import SHUTTING_DOWN

    if threading.current_thread() is threading.main_thread():  # signals are set from a process's main thread
        signal.signal(HAND_BACK_SIGNAL, lambda _signum, _frame: SHUTTING_DOWN.set())


@worker_process_init.connect
def _warm_up(**_kwargs) -> None:
    """Each pool process connects and loads the tokenizer before its first task, not during it."""
    from workers.generation import tokenizer
    from workers.runtime import runtime

    listen_for_hand_back()
    runtime()
    tokenizer()
