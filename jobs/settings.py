"""The one settings object, read from environment variables."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VAR = Path("var")


#: The most checkpoints a job may keep (the KEEP_CHECKPOINTS setting and hyperparameters.keep_checkpoints alike).
KEEP_CHECKPOINTS_MAX = 1000
#: The most devices one job may run on (jobs.specs.TrainSpec.devices) and one worker may own (WORKER_DEVICES): a
#: host's GPUs (8 on most, 16 on the largest).
MAX_DEVICES = 16


def integer_setting(env: Mapping[str, str], variable: str, default: int, low: int = 1, high: int | None = None) -> int:
    """The integer setting `variable`, refused at start (ValueError naming it) unless it lies in [low, high]."""
    raw = env.get(variable)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{variable} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{variable} must be {bound}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    artifact_dir: Path
    max_upload_bytes: int
    max_inline_prompts: int
    job_lease_seconds: int
    job_max_attempts: int
    job_redispatch_seconds: int
    generation_shard_size: int
    model_cache_size: int
    keep_checkpoints: int
    event_streams: int
    event_stream_seconds: int
    metrics_token: str | None
    worker_devices: int | None
    job_devices_wait_seconds: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings from `environ` (default os.environ); ValueError naming the variable for a value that
        cannot take effect (not an integer, zero or negative where a count or a time is meant)."""
        env = os.environ if environ is None else environ
        var = Path(env.get("GPT2JOBS_VAR_DIR", DEFAULT_VAR)).resolve()
        return cls(
            database_url=env.get("DATABASE_URL", f"sqlite:///{var / 'gpt2jobs.db'}"),
            # kombu's filesystem transport: a broker that needs no server (the embedded default).
            broker_url=env.get("BROKER_URL", "filesystem://"),
            artifact_dir=Path(env.get("ARTIFACT_DIR", var / "artifacts")).resolve(),
            max_upload_bytes=integer_setting(env, "MAX_UPLOAD_BYTES", 1 << 30),
            max_inline_prompts=integer_setting(env, "MAX_INLINE_PROMPTS", 1000),
            # A worker renews its claim on a job every third of this; a job whose claim lapses (its worker died)
            # is handed to another worker, which resumes it.
            job_lease_seconds=integer_setting(env, "JOB_LEASE_SECONDS", 60),
            # A job whose worker is lost (killed, out of memory, machine gone) this many times fails with
            # "worker_lost" instead of being tried again: a job that kills every worker it runs on ends.
            job_max_attempts=integer_setting(env, "JOB_MAX_ATTEMPTS", 3),
            # A queued job with no message for it waiting in the broker this long after its last message was
            # sent (the broker restarted empty, a publish never happened, a queue was purged) is sent again.
            job_redispatch_seconds=integer_setting(env, "JOB_REDISPATCH_SECONDS", 30),
            # Prompts per unit of bulk-generation work: any worker takes any shard, so more workers finish sooner.
            generation_shard_size=integer_setting(env, "GENERATION_SHARD_SIZE", 128),
            # Models each worker process keeps loaded between generation shards and jobs.
            model_cache_size=integer_setting(env, "MODEL_CACHE_SIZE", 2),
            # Checkpoints each training job keeps on disk: the last this many (the newest is the one it resumes
            # from) plus the one with the lowest validation loss; older ones are deleted as new ones are written.
            # A job's hyperparameters.keep_checkpoints overrides it.
            keep_checkpoints=integer_setting(env, "KEEP_CHECKPOINTS", 3, high=KEEP_CHECKPOINTS_MAX),
            # Live event streams (GET /v1/jobs/{id}/events as text/event-stream) each API process serves at once:
            # every stream holds one of its threads (gunicorn.conf.py gives each process this many threads plus
            # REQUEST_THREADS for plain requests); one more is answered 503 with Retry-After.
            event_streams=integer_setting(env, "EVENT_STREAMS", 32, high=1000),
            # The longest one stream connection stays open; then it ends and the client reconnects with
            # Last-Event-ID (as browsers' EventSource do by themselves), so no watcher holds a thread for good.
            event_stream_seconds=integer_setting(env, "EVENT_STREAM_SECONDS", 300),
            # When set, GET /metrics (Prometheus) needs `Authorization: Bearer <this>`; unset (or empty), it is
            # open, as Prometheus expects: keep it private at the proxy or the bind then (README, "Monitoring").
            metrics_token=env.get("METRICS_TOKEN") or None,
            # Devices this worker runs one job on (its GPUs, or CPU processes on a machine without any): a job with
            # `devices` up to this many is routed to it (jobs.queue.worker_queues). Unset: the GPUs it sees (CUDA's
            # device count, within CUDA_VISIBLE_DEVICES), or 1 without a GPU.
            worker_devices=integer_setting(env, "WORKER_DEVICES", 0, high=MAX_DEVICES) or None,
            # A queued job that asks for more devices than any live worker has is told so in an event at once, and
            # fails ("devices_unavailable") when none with enough has come for this long.
            job_devices_wait_seconds=integer_setting(env, "JOB_DEVICES_WAIT_SECONDS", 3600),
        )

    @property
    def broker_folder(self) -> Path:
        """Where the filesystem broker keeps its messages (used only when broker_url is filesystem://)."""
        return self.artifact_dir.parent / "broker"
