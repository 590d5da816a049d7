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
    generation_shard_size: int
    model_cache_size: int

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
            # Prompts per unit of bulk-generation work: any worker takes any shard, so more workers finish sooner.
            generation_shard_size=int(env.get("GENERATION_SHARD_SIZE", 128)),
            # Models each worker process keeps loaded between generation shards and jobs.
            model_cache_size=int(env.get("MODEL_CACHE_SIZE", 2)),
        )

    @property
    def broker_folder(self) -> Path:
        """Where the filesystem broker keeps its messages (used only when broker_url is filesystem://)."""
        return self.artifact_dir.parent / "broker"
