"""Pause and resume (job statuses "pausing" and "paused"); checkpoints registered as models (model source
"checkpoint" with the checkpoint's step); a checkpoint's validation token accuracy.

On SQLite the two CHECK constraints are edited in place (see _replace_check).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
NEW_STATUSES = OLD_STATUSES + ("pausing", "paused")
OLD_SOURCES = ("job", "import")
NEW_SOURCES = OLD_SOURCES + ("checkpoint",)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _replace_check(table: str, name: str, column: str, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    """Allow `new` values instead of `old` in the CHECK constraint ck_<table>_<name>.

    SQLite cannot alter a constraint, and rebuilding the table would run its foreign keys' ON DELETE actions
    (they cannot be turned off inside the migration's transaction): the CHECK's text is edited in the schema
    instead, the procedure SQLite documents for constraint changes that existing rows satisfy
    (https://www.sqlite.org/lang_altertable.html#otheralter). Works offline too: plain SQL."""
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
    _replace_check("jobs", "status", "status", OLD_STATUSES, NEW_STATUSES)
    _replace_check("models", "source", "source", OLD_SOURCES, NEW_SOURCES)
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("checkpoint_step", sa.Integer(), nullable=True))
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("val_accuracy", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("val_accuracy")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("checkpoint_step")
    # Jobs and models the old schema cannot hold: paused jobs are cancelled, checkpoint models become imports.
    op.execute("UPDATE jobs SET status = 'cancelled' WHERE status IN ('pausing', 'paused')")
    op.execute("UPDATE models SET source = 'import' WHERE source = 'checkpoint'")
    _replace_check("models", "source", "source", NEW_SOURCES, OLD_SOURCES)
    _replace_check("jobs", "status", "status", NEW_STATUSES, OLD_STATUSES)
