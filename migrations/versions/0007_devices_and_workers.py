"""Data-parallel jobs: how many devices a job runs on (jobs.devices), since when no live worker has had that many
(jobs.devices_wanted_since), and the live workers with their device counts (workers).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # ADD COLUMN on both databases (SQLite too: no table rebuild, which would fire the events' ON DELETE CASCADE).
    op.add_column("jobs", sa.Column("devices", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("jobs", sa.Column("devices_wanted_since", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("device_type", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_seen_at"), "workers", ["seen_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_seen_at"), "workers")
    op.drop_table("workers")
    op.drop_column("jobs", "devices_wanted_since")  # native DROP COLUMN (SQLite 3.35+): no table rebuild
    op.drop_column("jobs", "devices")
