"""The per-step training metrics of train and finetune jobs (table job_metrics): which steps are kept, and how
a worker stores them.

Resolution: every step of a run of up to FULL_RESOLUTION_STEPS (10,000) steps. A longer run keeps every
`stride`-th step, stride = ceil(total_steps / 10,000): between 5,000 and 10,000 evenly spread points whatever
the length (at least the 2,000 a chart needs), so a run's rows stay bounded. Its first and last steps are kept
too, and so is every evaluation step (the worker adds those, since only it knows when an evaluation ran), so a
chart starts at step 1, ends at the final loss and shows every validation loss.

Writes are upserts on (job_id, step): a run resumed from a checkpoint trains the steps after it again and
rewrites their rows, on PostgreSQL and SQLite alike. Values that are not finite (NaN, infinities) are stored as
NULL: JSON has no way to write them, and SQLite stores a NaN as NULL anyway.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from jobs.execution import _insert
from jobs.models import JobMetric

__all__ = ["FULL_RESOLUTION_STEPS", "VALUE_COLUMNS", "metric_stride", "keeps_step", "upsert_metrics"]

#: Runs up to this many steps keep every step.
FULL_RESOLUTION_STEPS = 10_000
#: The columns of a row besides (job_id, step), in the order the API and the CSV file give them.
VALUE_COLUMNS = ("train_loss", "val_loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds")
#: Rows per INSERT: 8 parameters each stays below SQLite's oldest limit of 999 (PostgreSQL allows 65,535).
_BATCH_ROWS = 100


def metric_stride(total_steps: int) -> int:
    """Keep every this-many-th step of a run of `total_steps`: 1 up to FULL_RESOLUTION_STEPS, then
    ceil(total_steps / FULL_RESOLUTION_STEPS)."""
    return max(1, math.ceil(total_steps / FULL_RESOLUTION_STEPS))


def keeps_step(step: int, total_steps: int) -> bool:
    """Whether a run of `total_steps` keeps the metrics of `step` (1-based): a multiple of the stride, the first
    step or the last. (Evaluation steps are kept as well; the caller knows those.)"""
    return step == 1 or step == total_steps or step % metric_stride(total_steps) == 0


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def upsert_metrics(session: Session, job_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Insert or update the job's metric rows: each a mapping with `step` and any of VALUE_COLUMNS. A row that
    exists gets the columns given (a row with only `val_loss`, for an evaluation, leaves the others as they are);
    rows of the same step are merged, the later values winning. Non-finite values become NULL."""
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        unknown = set(row) - {"step", *VALUE_COLUMNS}
        if unknown:
            raise ValueError(f"unknown metric columns {sorted(unknown)}")
        merged.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if k != "step"})
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for step, given in sorted(merged.items()):
        columns = tuple(name for name in VALUE_COLUMNS if name in given)
        row_values: dict[str, Any] = {"job_id": job_id, "step": step, **{name: _finite(given[name]) for name in columns}}
        by_columns.setdefault(columns, []).append(row_values)
    for columns, values in by_columns.items():
        for start in range(0, len(values), _BATCH_ROWS):
            stmt = _insert(session, JobMetric).values(values[start:start + _BATCH_ROWS])
            if columns:
                stmt = stmt.on_conflict_do_update(index_elements=["job_id", "step"],
                                                  set_={name: stmt.excluded[name] for name in columns})
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=["job_id", "step"])
            session.execute(stmt)
