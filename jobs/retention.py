"""Checkpoint retention: which of a job's checkpoints stay on disk.

A job keeps its last `keep_last` checkpoints (the newest is the one training resumes from, so it is always kept)
plus the one with the lowest validation loss, when any checkpoint has one. `steps_to_keep` is the decision, pure
and torch-free; `prune_checkpoint_rows` applies it to a job's checkpoint rows (the worker after every checkpoint,
the garbage collector for finished jobs) and returns the directories the caller removes once it has committed.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs.models import Checkpoint

__all__ = ["steps_to_keep", "prune_checkpoint_rows"]


def steps_to_keep(checkpoints: Iterable[tuple[int, float | None]], keep_last: int) -> set[int]:
    """The steps to keep of `checkpoints` ((step, validation loss or None) pairs): the `keep_last` highest steps
    and the step with the lowest finite validation loss (of equal losses, the later step). Never empty when
    `checkpoints` is not: the newest step is always kept."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
    losses: dict[int, float | None] = {}
    for step, val_loss in checkpoints:
        losses[step] = val_loss if losses.get(step) is None else losses[step]
    keep = set(sorted(losses)[-keep_last:])
    scored = [(loss, -step) for step, loss in losses.items() if loss is not None and math.isfinite(loss)]
    if scored:
        keep.add(-min(scored)[1])
    return keep


def prune_checkpoint_rows(session: Session, job_id: str, keep_last: int,
                          on_disk: Mapping[int, str] | None = None) -> list[str]:
    """Delete the rows of the job's checkpoints that `steps_to_keep` does not keep, and return the directories
    to remove after the transaction commits: those rows' storage paths and the `on_disk` ones ({step: path},
    complete checkpoint directories found on disk, recorded or not) of steps not kept. A directory on disk
    without a row counts as a checkpoint without a validation loss."""
    on_disk = dict(on_disk or {})
    rows = session.execute(
        select(Checkpoint.step, Checkpoint.val_loss, Checkpoint.storage_path).where(Checkpoint.job_id == job_id)
    ).all()
    candidates = [(row.step, row.val_loss) for row in rows] + [(step, None) for step in on_disk]
    keep = steps_to_keep(candidates, keep_last) if candidates else set()
    doomed = sorted({row.step for row in rows} - keep)
    if doomed:
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step.in_(doomed)))
    paths = [row.storage_path for row in rows if row.step not in keep]
    paths += [path for step, path in sorted(on_disk.items()) if step not in keep and path not in paths]
    return paths
