"""Job metrics: the per-step training metrics of train and finetune jobs (GET /v1/jobs/{id}/metrics).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=40)
VALUES = ("train_loss", "val_loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds")


def upgrade() -> None:
    op.create_table(
        "job_metrics",
        sa.Column("job_id", ID, nullable=False),
        sa.Column("step", sa.Integer(), autoincrement=False, nullable=False),
        *(sa.Column(name, sa.Float(), nullable=True) for name in VALUES),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_metrics_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "step", name=op.f("pk_job_metrics")),
    )


def downgrade() -> None:
    op.drop_table("job_metrics")
