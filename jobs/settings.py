"""The one settings object, read from environment variables."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VAR = Path("var")


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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        var = Path(env.get("GPT2JOBS_VAR_DIR", DEFAULT_VAR)).resolve()
        return cls(
            database_url=env.get("DATABASE_URL", f"sqlite:///{var / 'gpt2jobs.db'}"),
            # kombu's filesystem transport: a broker that needs no server (the embedded default).
            broker_url=env.get("BROKER_URL", "filesystem://"),
            artifact_dir=Path(env.get("ARTIFACT_DIR", var / "artifacts")).resolve(),
            max_upload_bytes=int(env.get("MAX_UPLOAD_BYTES", 1 << 30)),
            max_inline_prompts=int(env.get("MAX_INLINE_PROMPTS", 1000)),
            # A worker renews its claim on a job every third of this; a job whose claim lapses (its worker died)
            # is handed to another worker, which resumes it.
            job_lease_seconds=int(env.get("JOB_LEASE_SECONDS", 60)),
            # A job whose worker is lost (killed, out of memory, machine gone) this many times fails with
            # "worker_lost" instead of being tried again: a job that kills every worker it runs on ends.
            job_max_attempts=int(env.get("JOB_MAX_ATTEMPTS", 3)),
            # A queued job with no message for it waiting in the broker this long after its last message was
            # sent (the broker restarted empty, a publish never happened, a queue was purged) is sent again.
            job_redispatch_seconds=int(env.get("JOB_REDISPATCH_SECONDS", 30)),
            # Prompts per unit of bulk-generation work: any worker takes any shard, so more workers finish sooner.
            generation_shard_size=int(env.get("GENERATION_SHARD_SIZE", 128)),
            # Models each worker process keeps loaded between generation shards and jobs.
            model_cache_size=int(env.get("MODEL_CACHE_SIZE", 2)),
            # Checkpoints each training job keeps on disk: the last this many (the newest is the one it resumes
            # from) plus the one with the lowest validation loss; older ones are deleted as new ones are written.
            # A job's hyperparameters.keep_checkpoints overrides it.
            keep_checkpoints=int(env.get("KEEP_CHECKPOINTS", 3)),
        )

    def __post_init__(self) -> None:
        for field, variable in (("job_lease_seconds", "JOB_LEASE_SECONDS"), ("job_max_attempts", "JOB_MAX_ATTEMPTS"),
                                ("job_redispatch_seconds", "JOB_REDISPATCH_SECONDS")):
            if getattr(self, field) < 1:
                raise ValueError(f"{variable} must be a positive integer, got {getattr(self, field)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"KEEP_CHECKPOINTS must be a positive integer, got {self.keep_checkpoints}")

    @property
    def broker_folder(self) -> Path:
        """Where the filesystem broker keeps its messages (used only when broker_url is filesystem://)."""
        return self.artifact_dir.parent / "broker"
