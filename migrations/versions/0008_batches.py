"""OpenAI batches: the batches table; deleted_items (where a deleted file or model stood in its list, so a list
being deleted page by page can be followed); and the file purposes "fine-tune" (training text, read as "train"), "batch"
(OpenAI batch request lines) and "batch_output" (a batch's output and error files, written by the platform).

On SQLite the files.purpose CHECK constraint is edited in place (see _replace_check, as in 0006).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_PURPOSES = ("train", "generate")
NEW_PURPOSES = OLD_PURPOSES + ("fine-tune", "batch", "batch_output")
OUTCOMES = ("completed", "failed", "expired", "cancelled")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _replace_check(table: str, name: str, column: str, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    """Allow `new` values instead of `old` in the CHECK constraint ck_<table>_<name> (0006 explains the SQLite
    procedure: the CHECK's text is edited in the schema, no table rebuild that would fire ON DELETE actions)."""
    if context.get_context().dialect.name == "sqlite":
        before, after = _in(column, old), _in(column, new)
        op.execute("PRAGMA writable_schema = ON")
        op.execute(f"UPDATE sqlite_master SET sql = replace(sql, \"{before}\", \"{after}\") "
                   f"WHERE type = 'table' AND name = '{table}'")
        if not context.is_offline_mode():  # other connections re-read the schema when its version changes
            version = op.get_bind().exec_driver_sql("PRAGMA schema_version").scalar()
            op.execute(f"PRAGMA schema_version = {int(version) + 1}")
        op.execute("PRAGMA writable_schema = OFF")
        return
    op.drop_constraint(op.f(f"ck_{table}_{name}"), table, type_="check")
    op.create_check_constraint(op.f(f"ck_{table}_{name}"), table, _in(column, new))


def upgrade() -> None:
    _replace_check("files", "purpose", "purpose", OLD_PURPOSES, NEW_PURPOSES)
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(40), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("metadata", JSON, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("errors", JSON, nullable=True),
        sa.Column("output_file_id", sa.String(40), nullable=True),
        sa.Column("error_file_id", sa.String(40), nullable=True),
        sa.Column("request_counts", JSON, nullable=True),
        sa.Column("usage", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelling_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(_in("outcome", OUTCOMES), name=op.f("ck_batches_outcome")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_batches_job_id_jobs"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["output_file_id"], ["files.id"], name=op.f("fk_batches_output_file_id_files"),
                                ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["error_file_id"], ["files.id"], name=op.f("fk_batches_error_file_id_files"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_index(op.f("ix_batches_owner_created_at_id"), "batches", ["owner", "created_at", "id"])
    op.create_index(op.f("ix_batches_outcome_expires_at"), "batches", ["outcome", "expires_at"])
    op.create_index(op.f("ix_batches_job_id"), "batches", ["job_id"])
    op.create_table(
        "deleted_items",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deleted_items")),
    )
    op.create_index(op.f("ix_deleted_items_deleted_at"), "deleted_items", ["deleted_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_deleted_items_deleted_at"), "deleted_items")
    op.drop_table("deleted_items")
    op.drop_index(op.f("ix_batches_job_id"), "batches")
    op.drop_index(op.f("ix_batches_outcome_expires_at"), "batches")
    op.drop_index(op.f("ix_batches_owner_created_at_id"), "batches")
    op.drop_table("batches")
    # Files the old schema cannot hold: fine-tune files are training files; batch files and batch outputs go (jobs
    # keep their history with the reference set to NULL; the stored bytes are collected as files without a row).
    op.execute("UPDATE files SET purpose = 'train' WHERE purpose = 'fine-tune'")
    op.execute("DELETE FROM files WHERE purpose IN ('batch', 'batch_output')")
    _replace_check("files", "purpose", "purpose", NEW_PURPOSES, OLD_PURPOSES)
