"""The queue wiring shared by the API (which enqueues) and the workers (which consume).

Jobs live in the database; the broker only carries "run job <id>". Messages are sent BY TASK NAME with the
job id as their only argument, so the API never imports the worker code (or torch).

Two brokers are supported, chosen by ``Settings.broker_url``:

* ``filesystem://`` (the embedded default): kombu's filesystem transport, every message a file under
  ``settings.broker_folder`` (``messages/``; consumed messages are moved to ``processed/``, a rename on the
  same file system, so two consumers never both take the same message; ``control/`` holds the exchange
  tables). Needs no server; producer and consumers must share that folder.
* ``redis://...``: the deployment broker, configured for long GPU jobs: a message is acknowledged only when
  its task finishes (``task_acks_late``), redelivered if the worker process dies
  (``task_reject_on_worker_lost``), a worker reserves one message at a time (``worker_prefetch_multiplier=1``)
  and an unacknowledged message is redelivered only after ``VISIBILITY_TIMEOUT`` seconds (default 12 h; it
  must exceed the longest job, or a still-running job gets delivered a second time).

No result backend is used (``task_ignore_result``): job state and results live in the database.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from jobs.errors import BrokerUnavailable
from jobs.settings import MAX_DEVICES, Settings

log = logging.getLogger(__name__)

__all__ = [
    "TASK_NAMES", "JOB_QUEUES", "QUEUES", "DEFAULT_QUEUE", "ENV_VARS", "BrokerUnavailable", "task_name", "queue_for",
    "train_queue", "worker_queues",
    "visibility_timeout", "celery_config", "make_celery", "enqueue", "broker_reachable", "waiting_job_ids",
    "message_job_id",
]

#: Job type -> Celery task name. The API enqueues by these names; workers register tasks under them.
TASK_NAMES: dict[str, str] = {
    "train": "gpt2jobs.train",
    "finetune": "gpt2jobs.finetune",
    "generate": "gpt2jobs.generate",
}

#: Job type -> queue of its one-device jobs. Training and fine-tuning share the "train" queue; generation has its
#: own. A training job on N > 1 devices goes to "train-N" (queue_for), which only workers with N or more consume.
JOB_QUEUES: dict[str, str] = {"train": "train", "finetune": "train", "generate": "generate"}


def train_queue(devices: int) -> str:
    """The queue of training and fine-tuning jobs on `devices` devices: "train", "train-2", ... "train-16"."""
    if not isinstance(devices, int) or not 1 <= devices <= MAX_DEVICES:
        raise ValueError(f"devices must be from 1 to {MAX_DEVICES}, got {devices!r}")
    return "train" if devices == 1 else f"train-{devices}"


def worker_queues(devices: int) -> tuple[str, ...]:
    """The queues a worker with `devices` devices consumes (unless told otherwise with ``--queues``): the training
    queues of every job that fits it (1 to `devices` devices), and generation."""
    return tuple(train_queue(n) for n in range(1, devices + 1)) + ("generate",)


#: Every queue, in a stable order: what the API declares and the reconciliation looks into.
QUEUES: tuple[str, ...] = worker_queues(MAX_DEVICES)

#: Where a message for a task name nobody routed would go (one the workers consume, unlike Celery's "celery").
DEFAULT_QUEUE = "train"

#: Environment variables this module reads (besides those ``Settings.from_env`` reads).
ENV_VARS: tuple[str, ...] = ("VISIBILITY_TIMEOUT",)

DEFAULT_VISIBILITY_TIMEOUT = 12 * 60 * 60  # seconds; must exceed the longest job

#: Seconds to wait for a TCP connection to the broker, and the publish retry policy: an unreachable broker
#: fails an enqueue within a few seconds instead of blocking an API request for minutes.
CONNECT_TIMEOUT = 3.0
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 1.0}


def task_name(job_type: str) -> str:
    try:
        return TASK_NAMES[job_type]
    except KeyError:
        raise ValueError(f"unknown job type {job_type!r}; expected one of {sorted(TASK_NAMES)}") from None


def queue_for(job_type: str, devices: int = 1) -> str:
    """The queue of a job of `job_type` on `devices` devices (only training jobs run on more than one)."""
    task_name(job_type)  # same error for an unknown type
    if devices != 1 and JOB_QUEUES[job_type] == "train":
        return train_queue(devices)
    return JOB_QUEUES[job_type]


def visibility_timeout(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get("VISIBILITY_TIMEOUT")
    if raw in (None, ""):
        return DEFAULT_VISIBILITY_TIMEOUT
    value = int(raw)
    if value <= 0:
        raise ValueError(f"VISIBILITY_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def filesystem_transport_options(broker_folder: Path) -> dict[str, object]:
    """kombu filesystem transport options under ``broker_folder``; creates the folders.

    ``data_folder_in`` (read from) and ``data_folder_out`` (written to) are the same folder, so producer and
    consumer see the same messages. kombu needs every folder to exist: it would ``shutil.move`` a consumed
    message onto the path of a missing ``processed/`` folder, and it creates ``control/`` without parents.
    """
    folder = Path(broker_folder).resolve()
    messages, processed, control = folder / "messages", folder / "processed", folder / "control"
    for path in (messages, processed, control):
        path.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(messages),
        "data_folder_out": str(messages),
        # Keep consumed messages in processed/ (a same-file-system rename, atomic) rather than kombu's default
        # of moving them to the system temp dir, which may be another file system (copy + delete: two
        # workers could both copy, and both run, the same message). They are small; prune at will.
        "store_processed": True,
        "processed_folder": str(processed),
        "control_folder": str(control),
        # Look for new messages ten times a second (kombu's default is once): a job starts without a visible lag.
        "polling_interval": 0.1,
    }


def celery_config(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """The Celery configuration for ``settings.broker_url`` (see the module docstring)."""
    url = settings.broker_url
    timeout = visibility_timeout(environ)
    config: dict[str, object] = {
        "broker_url": url,
        "broker_connection_timeout": CONNECT_TIMEOUT,
        "broker_connection_retry_on_startup": True,  # the worker waits for the broker when it starts
        "task_publish_retry": True,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
        "task_queues": tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES),
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": {name: {"queue": JOB_QUEUES[job_type]} for job_type, name in TASK_NAMES.items()},
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Long GPU jobs: ack when done, redeliver if the worker dies, take one message at a time.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Pool processes load the tokenizer and connect before their first task (workers.app); allow for it.
        "worker_proc_alive_timeout": 60,
        # A broker connection blip must not stop a running job: its lease in the database already keeps a
        # redelivered message from running it twice (Celery's opposite default would throw away the work done
        # since the last checkpoint).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "timezone": "UTC",
        "enable_utc": True,
    }
    if url.startswith("filesystem://"):
        config["broker_transport_options"] = filesystem_transport_options(settings.broker_folder)
    else:
        transport_options = {
            "visibility_timeout": timeout,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": 30,
            "retry_on_timeout": True,
        }
        config["broker_transport_options"] = transport_options
        # A worker takes a message only when a pool process is free to run it, also after a reconnection (which
        # resets the broker's prefetch count): a message that waits for a busy worker stays in the queue, where
        # the reconciliation (jobs.recovery) sees it and sends no second one.
        config["worker_disable_prefetch"] = True
        # Set in all three places (broker transport, result-backend transport, top level): different Celery
        # and kombu code paths read different ones, and none may fall back to kombu's 1 h Redis default.
        config["result_backend_transport_options"] = {"visibility_timeout": timeout}
        config["visibility_timeout"] = timeout
    return config


def make_celery(settings: Settings | None = None, environ: Mapping[str, str] | None = None,
                main: str = "gpt2jobs") -> Celery:
    """A Celery app wired to ``settings.broker_url`` (``Settings.from_env()`` when not given)."""
    settings = Settings.from_env(environ) if settings is None else settings
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings, environ))
    return app


def enqueue(celery_app: Celery, job_type: str, job_id: str | int, devices: int = 1) -> str:
    """Send job ``job_id`` of ``job_type`` on ``devices`` devices to its queue (queue_for), by task name; returns
    the Celery task id.

    Raises ``ValueError`` for an unknown job type and ``BrokerUnavailable`` when the broker cannot be reached
    (within a few seconds: see ``CONNECT_TIMEOUT`` and ``PUBLISH_RETRY_POLICY``).
    """
    name, queue = task_name(job_type), queue_for(job_type, devices)
    try:
        result = celery_app.send_task(name, args=[job_id], queue=queue)
    except Exception as exc:  # kombu OperationalError, ChannelError, redis ConnectionError, OSError...
        raise BrokerUnavailable(f"could not enqueue {job_type} job {job_id} on queue {queue!r}: {exc}") from exc
    log.info("enqueued %s job %s as %s on queue %s", job_type, job_id, name, queue)
    return result.id


def broker_reachable(celery_app: Celery, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether the broker accepts a connection now (one attempt, no retries): for /readyz."""
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            if conn.transport_cls == "filesystem" or conn.transport.driver_type == "filesystem":
                options = conn.transport_options
                folder = Path(str(options.get("data_folder_out", "")))
                return folder.is_dir() and os.access(folder, os.W_OK)
            # Redis connects lazily: ask it something.
            with conn.channel() as channel:
                client = getattr(channel, "client", None)
                if client is not None:
                    client.ping()
        return True
    except Exception as exc:  # any failure to reach it means "not ready"
        log.warning("broker not reachable: %s", exc)
        return False


def message_job_id(raw: bytes | str) -> str | None:
    """The job id a serialized Celery message (kombu's JSON envelope) carries, or None if it is not ours."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        if message.get("headers", {}).get("task") in TASK_NAMES.values() and args and isinstance(args[0], str):
            return args[0]
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    return None


def waiting_job_ids(celery_app: Celery, taken_within: float = 0.0) -> set[str] | None:
    """The ids of the jobs that have a message waiting in a queue now, or None when this broker cannot be looked
    into (then nothing can be said about any job).

    Redis: the queues' lists (every priority level), and the messages a worker took less than `taken_within`
    seconds ago without acknowledging them yet (it is about to claim the job, or puts the message back after a
    database error). An older unacknowledged message is NOT waiting: if its worker died, it would only come back
    after the visibility timeout. Filesystem: the message files not yet moved to processed/.
    """
    try:
        with celery_app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT)
            driver = conn.transport.driver_type
            if driver == "filesystem":
                folder = Path(str(conn.transport_options.get("data_folder_in", "")))
                raws: list[bytes | str] = []
                for path in folder.glob("*.msg"):
                    try:
                        raws.append(path.read_bytes())
                    except FileNotFoundError:  # taken by a worker meanwhile
                        pass
            elif driver == "redis":
                channel = conn.default_channel
                client = channel.client
                raws = []
                for queue in QUEUES:
                    for priority in channel.priority_steps:
                        raws += client.lrange(channel._q_for_pri(queue, priority), 0, -1)
                if taken_within > 0:
                    tags = client.zrangebyscore(channel.unacked_index_key, time.time() - taken_within, "+inf")
                    if tags:
                        # Each value is [message, exchange, routing key] (kombu's redis QoS.append).
                        raws += [json.dumps(json.loads(value)[0]) for value in
                                 client.hmget(channel.unacked_key, tags) if value is not None]
            else:
                return None
    except Exception as exc:  # the broker is away: nothing can be said
        log.warning("could not look into the broker's queues: %s", exc)
        return None
    return {job_id for job_id in map(message_job_id, raws) if job_id is not None}
