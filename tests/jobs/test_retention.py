"""Checkpoint retention: the decision (the last N plus the best by validation loss, never the newest) and its
application to a job's checkpoint rows on SQLite and PostgreSQL."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from jobs import repository
from jobs.db import session_scope
from jobs.models import Checkpoint
from jobs.retention import prune_checkpoint_rows, steps_to_keep


def test_keeps_the_last_n_and_the_best_by_validation_loss():
    checkpoints = [(100, 3.0), (200, 2.1), (300, 2.5), (400, 2.7), (500, 2.6)]
    assert steps_to_keep(checkpoints, 2) == {400, 500, 200}
    assert steps_to_keep(checkpoints, 1) == {500, 200}
    assert steps_to_keep(checkpoints, 4) == {200, 300, 400, 500}  # the best is among the last 4
    assert steps_to_keep(checkpoints, 10) == {100, 200, 300, 400, 500}


def test_without_validation_losses_only_the_last_n_stay():
    assert steps_to_keep([(1, None), (2, None), (3, None)], 1) == {3}
    assert steps_to_keep([(1, None), (2, math.nan), (3, None)], 2) == {2, 3}  # NaN is no best
    assert steps_to_keep([(1, 2.0), (2, math.nan), (3, None)], 1) == {1, 3}
    assert steps_to_keep([], 3) == set()


def test_of_equal_losses_the_later_checkpoint_is_the_best():
    # a checkpoint between evaluations carries the last evaluation's loss: the later one has trained longer
    assert steps_to_keep([(10, 1.5), (20, 1.5), (30, 1.9), (40, 2.0)], 1) == {20, 40}


@pytest.mark.parametrize("keep", [0, -1, 1.5, True, None, "3"])
def test_keep_must_be_a_positive_integer(keep):
    with pytest.raises(ValueError, match="keep_last"):
        steps_to_keep([(1, 1.0)], keep)


@given(st.dictionaries(st.integers(0, 10_000), st.one_of(st.none(), st.floats(0, 20)), min_size=1),
       st.integers(1, 6))
def test_the_newest_always_stays_and_at_most_n_plus_one_do(losses, keep):
    kept = steps_to_keep(losses.items(), keep)
    assert max(losses) in kept
    assert len(kept) <= keep + 1 and kept <= set(losses)
    assert set(sorted(losses)[-keep:]) <= kept
    scored = [loss for loss in losses.values() if loss is not None]
    if scored:
        assert min(scored) in {losses[step] for step in kept}


def add_checkpoints(sessions, job_id: str, losses: dict[int, float | None]) -> None:
    with session_scope(sessions) as session:
        for step, loss in losses.items():
            session.add(Checkpoint(job_id=job_id, step=step, train_loss=3.0, val_loss=loss,
                                   storage_path=f"/artifacts/jobs/{job_id}/checkpoints/step-{step:06d}", bytes=10))


def steps(sessions, job_id: str) -> list[int]:
    with session_scope(sessions) as session:
        return list(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def new_job(sessions, owner: str) -> str:
    with session_scope(sessions) as session:
        return repository.create_job(session, owner, "generate", {"prompts": ["x"]})[0].id


def test_pruning_deletes_the_rows_not_kept_and_returns_their_folders(sessions, owner):
    job_id, other = new_job(sessions, owner), new_job(sessions, owner)
    add_checkpoints(sessions, job_id, {100: 3.0, 200: 2.0, 300: 2.4, 400: 2.6, 500: None})
    add_checkpoints(sessions, other, {100: 3.0, 200: 2.0, 300: 2.4})
    with session_scope(sessions) as session:
        doomed = prune_checkpoint_rows(session, job_id, 2)
    assert steps(sessions, job_id) == [200, 400, 500]
    assert doomed == [f"/artifacts/jobs/{job_id}/checkpoints/step-000100", f"/artifacts/jobs/{job_id}/checkpoints/step-000300"]
    assert steps(sessions, other) == [100, 200, 300]  # another job's checkpoints are its own
    with session_scope(sessions) as session:
        assert prune_checkpoint_rows(session, job_id, 2) == []  # nothing more to do
        listed = repository.list_checkpoints(session, owner, job_id)  # what GET /v1/jobs/{id}/checkpoints shows
    assert [c.step for c in listed] == [200, 400, 500]


def test_folders_on_disk_without_a_row_count_as_checkpoints_without_a_loss(sessions, owner):
    job_id = new_job(sessions, owner)
    add_checkpoints(sessions, job_id, {1: 1.0, 2: 2.0})
    on_disk = {1: "/a/step-000001", 2: "/a/step-000002", 3: "/a/step-000003", 4: "/a/step-000004"}
    with session_scope(sessions) as session:
        doomed = prune_checkpoint_rows(session, job_id, 1, on_disk)
    assert steps(sessions, job_id) == [1]  # the best stays; the newest (4, a folder without row) too
    assert sorted(doomed) == sorted([f"/artifacts/jobs/{job_id}/checkpoints/step-000002", "/a/step-000002",
                                     "/a/step-000003"])
