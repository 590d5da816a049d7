"""Tables of the job platform (SQLAlchemy 2.0 typed declarative). Portable across SQLite and PostgreSQL.

Ids are prefixed random strings ("job-" + 24 hex chars). Timestamps are stored in UTC and always come back
timezone-aware, on SQLite too.
"""
from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from jobs.states import QUEUED, STATUSES
from jobs.text import StoredJSON, StoredText

ID_LENGTH = 40  # the longest prefix ("model-") plus 24 characters, with room to spare
#: The length limit of every name-like column (owner, file name, model name, custom_id, idempotency key):
#: checked at the door with jobs.text.check_name, so no database ever refuses one.
NAME_LENGTH = 255
#: What a file is for: training text ("train", or OpenAI's "fine-tune", read alike), our prompt lines ("generate"),
#: OpenAI batch request lines ("batch", jobs.openai_batch), and a batch's output and error files ("batch_output",
#: written by the platform only: jobs.batches).
FILE_PURPOSES = ("train", "generate", "fine-tune", "batch", "batch_output")
#: The purposes a user may upload (batch_output files are the platform's).
UPLOAD_PURPOSES = ("train", "generate", "fine-tune", "batch")
JOB_TYPES = ("train", "finetune", "generate")
EVENT_LEVELS = ("info", "warning", "error")
EVENT_TYPES = ("message", "metrics")
MODEL_SOURCES = ("job", "import", "checkpoint")
SHARD_PENDING, SHARD_RUNNING, SHARD_DONE = "pending", "running", "done"
SHARD_STATUSES = (SHARD_PENDING, SHARD_RUNNING, SHARD_DONE)
#: How a batch ended, stored by its finalization (jobs.batches); its other statuses follow from its job.
BATCH_OUTCOMES = ("completed", "failed", "expired", "cancelled")


def new_id(prefix: str) -> str:
    """A fresh id such as "file-3f9c...": the prefix, a dash and 24 random hex characters (96 bits)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def unix_time(moment: datetime | None) -> int | None:
    """Whole seconds since the Unix epoch, as the API shows times (None stays None)."""
    return int(moment.timestamp()) if moment is not None else None


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE on PostgreSQL; on SQLite, naive UTC stored and made aware again on load."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC datetimes")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {
        datetime: UTCDateTime(),
        # Lossless for any text and float on every database (jobs.text): users' and models' words live here.
        dict[str, Any]: StoredJSON(),
        list[Any]: StoredJSON(),
    }


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=lambda: new_id("key"))
    owner: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class File(Base):
    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint(_in("purpose", FILE_PURPOSES), name="purpose"),
        Index(None, "owner", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=lambda: new_id("file"))
    owner: Mapped[str] = mapped_column(String(NAME_LENGTH))
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(NAME_LENGTH))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    records: Mapped[int] = mapped_column(Integer)
    # A training file's exact token count (documents and their end-of-text tokens), counted at upload for files
    # of up to jobs.readers.TOKEN_COUNT_MAX_BYTES; NULL for larger files and generation files.
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint(_in("source", MODEL_SOURCES), name="source"),
        Index(None, "owner", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=lambda: new_id("model"))
    owner: Mapped[str] = mapped_column(String(NAME_LENGTH))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    source: Mapped[str] = mapped_column(String(16))
    # use_alter: jobs and models reference each other, so this key is added after both tables exist.
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL", use_alter=True), index=True
    )
    # For source "checkpoint": the step of the job's checkpoint it was made from (job_id names the job).
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    config: Mapped[dict[str, Any]]
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("type", JOB_TYPES), name="type"),
        CheckConstraint(_in("status", STATUSES), name="status"),
        UniqueConstraint("owner", "idempotency_key"),
        Index(None, "owner", "created_at", "id"),
        Index(None, "status"),
        Index(None, "status", "dispatched_at"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=lambda: new_id("job"))
    owner: Mapped[str] = mapped_column(String(NAME_LENGTH))
    type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    training_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"), index=True)
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"), index=True)
    input_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"), index=True)
    base_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    progress: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    attempts: Mapped[int] = mapped_column(default=0)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    lease_owner: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    lease_expires_at: Mapped[datetime | None]
    # When a "run job <id>" message was last sent for the job (by the API, a worker handing it back, or the
    # reconciler, which sends a queued job again once no message for it waits in the broker: jobs.dispatch).
    dispatched_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    # How many times a worker was lost while running the job (its lease expired): at JOB_MAX_ATTEMPTS it fails.
    workers_lost: Mapped[int] = mapped_column(default=0)
    # Devices (GPUs, or CPU processes) a training job runs on at once (jobs.specs.TrainSpec.devices; 1 for other
    # jobs): its queue (jobs.queue.queue_for) and the workers that can take it follow from it.
    devices: Mapped[int] = mapped_column(default=1, server_default="1")
    # Since when the reconciliation has seen no live worker with `devices` devices (None: one exists, or nobody
    # looked yet); after JOB_DEVICES_WAIT_SECONDS the job fails with "devices_unavailable" (jobs.recovery).
    devices_wanted_since: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        CheckConstraint(_in("level", EVENT_LEVELS), name="level"),
        CheckConstraint(_in("type", EVENT_TYPES), name="type"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(StoredText)
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=lambda: new_id("ckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    # Fraction of the validation targets the model predicted exactly (argmax), at the evaluation of this step.
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    storage_path: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobMetric(Base):
    """One training step's metrics of a train or finetune job, for charts and files (workers.reporting writes
    them; jobs.training_metrics decides which steps are kept). Rewritten, not duplicated, when a resumed run
    trains a step again. A value that was not finite (an infinite gradient norm) is stored as NULL."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    train_loss: Mapped[float | None] = mapped_column(Float)  # nats per token, the step's mean over its micro-batches
    val_loss: Mapped[float | None] = mapped_column(Float)  # nats per token; only on evaluation steps
    learning_rate: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)  # total gradient norm before clipping
    tokens_per_second: Mapped[float | None] = mapped_column(Float)  # training tokens per second over this step
    # Wall-clock seconds from the job's first start (jobs.started_at) to the end of this step, so a resumed run
    # continues the count, and the time the job waited for another worker after a takeover is included.
    elapsed_seconds: Mapped[float | None] = mapped_column(Float)


class GenerationResult(Base):
    __tablename__ = "generation_results"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    custom_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    prompt: Mapped[str] = mapped_column(StoredText)
    completions: Mapped[list[Any]]
    usage: Mapped[dict[str, Any]]
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GenerationShard(Base):
    """A slice [start, stop) of a generate job's input, claimed by one worker at a time under a lease."""

    __tablename__ = "generation_shards"
    __table_args__ = (CheckConstraint(_in("status", SHARD_STATUSES), name="status"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    start: Mapped[int]
    stop: Mapped[int]  # exclusive
    status: Mapped[str] = mapped_column(String(16), default="pending")
    lease_owner: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Worker(Base):
    """A live worker (one Celery worker's main process), as its sweeper last reported it: how many devices it
    runs a job on, so a job that needs more than any live worker has is told so (jobs.recovery)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)  # "<hostname>:<pid>"
    devices: Mapped[int]
    device_type: Mapped[str] = mapped_column(String(16))  # "cuda" or "cpu"
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DeletedItem(Base):
    """Where a deleted file or model stood in its owner's list (newest first by created_at, then id), so that a
    page whose last item was deleted can still be followed with `after` (jobs.repository.remember_deleted)."""

    __tablename__ = "deleted_items"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    owner: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime]
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Batch(Base):
    """An OpenAI batch (jobs.batches): the requests of an input file (purpose "batch") run as one generate job.

    What users see as its status is derived from this row and its job (jobs.batches.batch_status). `outcome` is
    written once: by the validation that refused the batch ("failed", with `errors`), or by the finalization that
    wrote its output and error files after its job ended (completed, failed, expired or cancelled)."""

    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(_in("outcome", BATCH_OUTCOMES), name="outcome"),
        Index(None, "owner", "created_at", "id"),
        Index(None, "outcome", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)  # "batch_" + 24 hex (OpenAI's style)
    owner: Mapped[str] = mapped_column(String(NAME_LENGTH))
    endpoint: Mapped[str] = mapped_column(String(64))
    # No foreign key: the batch keeps naming its input file after the file is deleted, as OpenAI's do.
    input_file_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    completion_window: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(NAME_LENGTH))  # the model its requests name
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    outcome: Mapped[str | None] = mapped_column(String(16))
    errors: Mapped[list[Any] | None]  # [{"code", "message", "param", "line"}]
    output_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    error_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    request_counts: Mapped[dict[str, Any] | None]  # {"total", "completed", "failed"} once finalized
    usage: Mapped[dict[str, Any] | None]  # {"input_tokens", "output_tokens"} once finalized
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    cancelling_at: Mapped[datetime | None]  # a cancel was asked for
    expired_at: Mapped[datetime | None]  # the completion window passed before the job ended: its job was stopped
    finished_at: Mapped[datetime | None]  # when `outcome` was written
