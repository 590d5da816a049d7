"""Initial schema: api keys, files, models, jobs, job events, checkpoints, generation results.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(length=40)


def timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def models_job_fk_inline() -> bool:
    """jobs and models reference each other. SQLite cannot add a foreign key to an existing table but accepts
    one naming a table that does not exist yet, so there it is declared inline; elsewhere it is added once jobs
    exists. Either way no batch table rebuild is needed, so `--sql` works on both."""
    return op.get_context().dialect.name == "sqlite"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", ID, nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        timestamp("created_at"),
        timestamp("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_owner"), "api_keys", ["owner"])

    op.create_table(
        "files",
        sa.Column("id", ID, nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("storage_path", sa.Text(), nullable=False),
        timestamp("created_at"),
        sa.CheckConstraint("purpose IN ('train', 'generate')", name=op.f("ck_files_purpose")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
    )
    op.create_index(op.f("ix_files_owner_created_at_id"), "files", ["owner", "created_at", "id"])

    models_job_fk = sa.ForeignKeyConstraint(
        ["job_id"], ["jobs.id"], name=op.f("fk_models_job_id_jobs"), ondelete="SET NULL"
    )
    op.create_table(
        "models",
        sa.Column("id", ID, nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("job_id", ID, nullable=True),
        sa.Column("config", JSON, nullable=False),
        sa.Column("parameter_count", sa.BigInteger(), nullable=False),
        sa.Column("storage_path", sa.Text(), nullable=False),
        timestamp("created_at"),
        sa.CheckConstraint("source IN ('job', 'import')", name=op.f("ck_models_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        *([models_job_fk] if models_job_fk_inline() else []),
    )
    op.create_index(op.f("ix_models_job_id"), "models", ["job_id"])
    op.create_index(op.f("ix_models_owner_created_at_id"), "models", ["owner", "created_at", "id"])

    op.create_table(
        "jobs",
        sa.Column("id", ID, nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("training_file_id", ID, nullable=True),
        sa.Column("validation_file_id", ID, nullable=True),
        sa.Column("input_file_id", ID, nullable=True),
        sa.Column("base_model_id", ID, nullable=True),
        sa.Column("progress", JSON, nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.Column("error", JSON, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        timestamp("lease_expires_at", nullable=True),
        timestamp("created_at"),
        timestamp("started_at", nullable=True),
        timestamp("finished_at", nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelling', 'cancelled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.CheckConstraint("type IN ('train', 'finetune', 'generate')", name=op.f("ck_jobs_type")),
        sa.ForeignKeyConstraint(
            ["training_file_id"], ["files.id"], name=op.f("fk_jobs_training_file_id_files"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["validation_file_id"], ["files.id"], name=op.f("fk_jobs_validation_file_id_files"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["input_file_id"], ["files.id"], name=op.f("fk_jobs_input_file_id_files"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["models.id"], name=op.f("fk_jobs_base_model_id_models"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("owner", "idempotency_key", name=op.f("uq_jobs_owner_idempotency_key")),
    )
    op.create_index(op.f("ix_jobs_owner_created_at_id"), "jobs", ["owner", "created_at", "id"])
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])
    op.create_index(op.f("ix_jobs_training_file_id"), "jobs", ["training_file_id"])
    op.create_index(op.f("ix_jobs_validation_file_id"), "jobs", ["validation_file_id"])
    op.create_index(op.f("ix_jobs_input_file_id"), "jobs", ["input_file_id"])
    op.create_index(op.f("ix_jobs_base_model_id"), "jobs", ["base_model_id"])

    if not models_job_fk_inline():
        op.create_foreign_key(
            op.f("fk_models_job_id_jobs"), "models", "jobs", ["job_id"], ["id"], ondelete="SET NULL"
        )

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", ID, nullable=False),
        timestamp("created_at"),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", JSON, nullable=True),
        sa.CheckConstraint("level IN ('info', 'warning', 'error')", name=op.f("ck_job_events_level")),
        sa.CheckConstraint("type IN ('message', 'metrics')", name=op.f("ck_job_events_type")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index(op.f("ix_job_events_job_id"), "job_events", ["job_id"])

    op.create_table(
        "checkpoints",
        sa.Column("id", ID, nullable=False),
        sa.Column("job_id", ID, nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("val_loss", sa.Float(), nullable=True),
        sa.Column("storage_path", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        timestamp("created_at"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_checkpoints_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("job_id", "step", name=op.f("uq_checkpoints_job_id_step")),
    )

    op.create_table(
        "generation_results",
        sa.Column("job_id", ID, nullable=False),
        sa.Column("index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("custom_id", sa.String(length=255), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("completions", JSON, nullable=False),
        sa.Column("usage", JSON, nullable=False),
        sa.Column("error", JSON, nullable=True),
        timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_generation_results_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "index", name=op.f("pk_generation_results")),
    )


def downgrade() -> None:
    op.drop_table("generation_results")
    op.drop_table("checkpoints")
    op.drop_table("job_events")
    if not models_job_fk_inline():
        op.drop_constraint(op.f("fk_models_job_id_jobs"), "models", type_="foreignkey")
    op.drop_table("jobs")
    op.drop_table("models")
    op.drop_table("files")
    op.drop_table("api_keys")
