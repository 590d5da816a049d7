"""Per-step training metrics (job_metrics): what a run writes, in-process on SQLite and PostgreSQL; the
stride of long runs; a resumed run rewrites its rows."""
from __future__ import annotations

import math
import threading
import time
from datetime import datetime, timezone

from sqlalchemy import select

from gpt2core.train import StepMetrics
from jobs import execution
from jobs.db import session_scope
from jobs.models import JobMetric
from jobs.training_metrics import FULL_RESOLUTION_STEPS, keeps_step, metric_stride, upsert_metrics
from workers.reporting import JobReporter
from workers.runtime import SHUTTING_DOWN, LeaseKeeper, Runtime
from workers.training import run_training

from .test_worker_runs import CORPUS, events, job, train_job, upload


def metric_rows(rt: Runtime, job_id: str) -> list[JobMetric]:
    with session_scope(rt.sessions) as session:
        return list(session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)))


def test_a_run_of_n_steps_writes_n_rows_equal_to_its_metrics_events(rt, owner):
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS), max_steps=7, eval_every=3, checkpoint_every=0,
                       sample_every=0)
    run_training(rt, job_id)
    done = job(rt, job_id)
    assert done.status == "succeeded"
    rows = metric_rows(rt, job_id)
    assert [row.step for row in rows] == list(range(1, 8))
    # Evaluations at 3 and 6, and the final one at 7 (7 is not a multiple of eval_every).
    assert [row.step for row in rows if row.val_loss is not None] == [3, 6, 7]
    found = [e.data for e in events(rt, job_id) if e.type == "metrics"]
    steps = {data["step"]: data for data in found if "loss" in data}
    evaluations = {data["step"]: data["val_loss"] for data in found if "val_loss" in data}
    assert sorted(steps) == list(range(1, 8)) and sorted(evaluations) == [3, 6, 7]
    for row in rows:
        event = steps[row.step]
        assert (row.train_loss, row.learning_rate, row.grad_norm, row.tokens_per_second) == (
            event["loss"], event["learning_rate"], event["grad_norm"], event["tokens_per_second"])
        assert row.val_loss == evaluations.get(row.step)
    elapsed = [row.elapsed_seconds for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert elapsed[-1] <= (done.finished_at - done.started_at).total_seconds() + 1.0
    assert done.progress["tokens"] == 7 * 2 * 32  # steps x batch_size x block_size


def test_a_resumed_run_rewrites_the_steps_after_its_checkpoint(rt, owner):
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS), max_steps=60, eval_every=20, checkpoint_every=0,
                       sample_every=0)
    runner = threading.Thread(target=run_training, args=(rt, job_id))
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while (job(rt, job_id).progress or {}).get("step", 0) < 1:
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.02)
        SHUTTING_DOWN.set()  # the worker checkpoints after its current step and hands the job back
        runner.join(60)
    finally:
        SHUTTING_DOWN.clear()
    assert job(rt, job_id).status == "queued"
    stopped_at = max(row.step for row in metric_rows(rt, job_id))
    assert stopped_at < 60
    first_elapsed = metric_rows(rt, job_id)[-1].elapsed_seconds
    # What a worker killed after its checkpoint would have left: rows past it, with other values.
    with session_scope(rt.sessions) as session:
        upsert_metrics(session, job_id, [{"step": s, "train_loss": -1.0, "val_loss": -1.0, "learning_rate": -1.0,
                                          "grad_norm": -1.0, "tokens_per_second": -1.0, "elapsed_seconds": -1.0}
                                         for s in range(stopped_at + 1, stopped_at + 4)])
    run_training(rt, job_id)
    assert job(rt, job_id).status == "succeeded"
    rows = metric_rows(rt, job_id)
    assert [row.step for row in rows] == list(range(1, 61))
    assert [row.step for row in rows if row.val_loss is not None] == [s for s in (20, 40, 60)]
    assert all(row.train_loss > 0 and row.learning_rate > 0 for row in rows)
    assert rows[stopped_at].elapsed_seconds >= first_elapsed  # the count goes on from the job's first start


def test_every_step_up_to_full_resolution_then_an_even_stride():
    assert metric_stride(1) == metric_stride(FULL_RESOLUTION_STEPS) == 1
    assert metric_stride(FULL_RESOLUTION_STEPS + 1) == 2
    assert all(keeps_step(step, 9_999) for step in range(1, 10_000))
    for total in (10_001, 123_457, 1_234_567):
        kept = [step for step in range(1, total + 1) if keeps_step(step, total)]
        stride = metric_stride(total)
        assert kept[0] == 1 and kept[-1] == total and len(kept) >= 2_000
        assert 5_000 <= len(kept) <= FULL_RESOLUTION_STEPS + 2
        inner = kept[1:-1] if total % stride else kept[1:]
        assert {b - a for a, b in zip(inner, inner[1:])} == {stride}  # evenly spread


def test_a_long_run_keeps_the_stride_the_ends_and_every_evaluation(rt, owner):
    """JobReporter fed a 30,000-step run's metrics (no training): the rows it writes."""
    total, evaluations = 30_000, {4_001, 29_999, 30_000}
    job_id = train_job(rt, owner, upload(rt, owner, CORPUS))
    with session_scope(rt.sessions) as session:
        claimed = execution.claim_job(session, job_id, rt.worker_id, 30)
    lease = LeaseKeeper(rt, lambda session: execution.renew_lease(session, job_id, rt.worker_id, 30), job_id)
    reporter = JobReporter(rt, job_id, lease, total, claimed.started_at)
    for step in range(1, total + 1):
        reporter.on_step(StepMetrics(step=step, loss=10 / step, learning_rate=1e-3, grad_norm=math.inf,
                                     tokens_per_second=1000.0, elapsed=0.0, tokens=64 * step, step_time=0.0))
        if step in evaluations:
            reporter.on_eval(step, 5 / step, math.exp(5 / step), 0.5)
    reporter.finished(total, 10 / total)
    rows = metric_rows(rt, job_id)
    assert [row.step for row in rows] == sorted({s for s in range(1, total + 1) if keeps_step(s, total)} | evaluations)
    assert len(rows) == 10_000 + 3 and metric_stride(total) == 3  # multiples of 3, step 1, 4,001 and 29,999
    assert {row.step: row.val_loss for row in rows if row.val_loss is not None} == {s: 5 / s for s in evaluations}
    assert all(row.grad_norm is None and row.train_loss == 10 / row.step for row in rows)
    assert job(rt, job_id).progress["tokens"] == 64 * total
    started = claimed.started_at.timestamp()
    assert 0 <= rows[-1].elapsed_seconds <= datetime.now(timezone.utc).timestamp() - started + 1
