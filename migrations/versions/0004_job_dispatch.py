"""Jobs: when their message was last sent (reconciliation re-sends lost ones) and how many workers were lost.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("workers_lost", sa.Integer(), nullable=False, server_default="0"))
    # Jobs queued before this revision count as sent when they were created.
    op.execute("UPDATE jobs SET dispatched_at = created_at WHERE status = 'queued'")
    op.create_index("ix_jobs_status_dispatched_at", "jobs", ["status", "dispatched_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_dispatched_at", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("workers_lost")
        batch.drop_column("dispatched_at")
