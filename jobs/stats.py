"""Cluster-wide job statistics for monitoring, computed from the database at the moment they are asked for.

Workers run on other hosts than the API, and any process may restart; the database is the one place that sees
every job. So these numbers are aggregates over its rows (counts, sums and histogram bucket counts computed by
SQL, never by loading rows into Python): whichever API process is asked gives the same cluster-wide answer, and
a restart loses nothing. api.monitoring serves them in the Prometheus text format.

Nothing here deletes rows, and no code deletes jobs or generation results today (workers.cleanup removes files
and checkpoint rows only). The totals below only grow; should jobs ever be deleted, they would fall, which
Prometheus reads as a counter reset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Float, and_, case, cast, func, literal, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from jobs.models import JOB_TYPES, GenerationResult, Job
from jobs.states import STATUSES, TERMINAL

__all__ = ["QUEUE_WAIT_BUCKETS", "DURATION_BUCKETS", "Histogram", "JobStats", "job_stats"]

#: Upper bounds (seconds) of the queue-wait histogram's buckets: a second to a day.
QUEUE_WAIT_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)
#: Upper bounds (seconds) of the job-duration histogram's buckets: ten seconds to a week.
DURATION_BUCKETS = (10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0)
TRAINING_TYPES = tuple(t for t in JOB_TYPES if t != "generate")


@dataclass(frozen=True)
class Histogram:
    """Observations in seconds: `buckets` are (upper bound, how many observations are at most that), cumulative
    and in increasing order, without the +Inf bucket (which is `count`); `sum` is their total."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


@dataclass(frozen=True)
class JobStats:
    #: Jobs by (type, status), every combination present (0 where there is none).
    jobs: dict[tuple[str, str], int]
    #: Seconds from submission (created_at) to the first start (started_at), of every job that started, by type.
    queue_wait: dict[str, Histogram]
    #: Seconds from the first start to the end (finished_at), of every finished job that started, by (type,
    #: terminal status). A job cancelled while queued never started and is not counted.
    duration: dict[tuple[str, str], Histogram]
    #: Training tokens of train and finetune jobs: the sum of their progress's `tokens` (the Trainer's count of
    #: tokens trained on, written with the progress about once a second and exactly at the end; a resumed run
    #: counts from its checkpoint's count, so steps trained again after a takeover count once). Jobs that ran
    #: before the progress carried `tokens` count 0.
    tokens_trained: int
    #: Tokens generated: the sum of every generation result's usage.completion_tokens (results are upserted per
    #: prompt, so a shard done twice counts once). Its cost grows with the number of results stored.
    tokens_generated: int
    #: Leases taken over: the sum of jobs.workers_lost, each a time a job's worker stopped renewing its lease and
    #: the job was taken back (jobs.execution.worker_lost). Shards of a generate job taken over from another
    #: worker of the same job are not counted (their events say so).
    lease_takeovers: int


def seconds_between(session: Session, start: InstrumentedAttribute[Any], end: InstrumentedAttribute[Any]) -> ColumnElement[float]:
    """SQL for the seconds from `start` to `end` (timestamp columns), never negative (clocks of the API and the
    workers may differ by a little). Resolution: microseconds on PostgreSQL, milliseconds on SQLite (what its
    date functions read of a timestamp)."""
    if session.get_bind().dialect.name == "sqlite":  # naive UTC text, which julianday() reads
        seconds: ColumnElement[float] = (func.julianday(end) - func.julianday(start)) * 86400.0
    else:
        seconds = cast(func.extract("epoch", end - start), Float)
    return case((seconds < 0, literal(0.0)), else_=seconds)


def histograms(session: Session, seconds: ColumnElement[float], keys: list[Any], where: ColumnElement[bool],
               bounds: tuple[float, ...]) -> dict[tuple[str, ...], Histogram]:
    """Histograms of `seconds` over the jobs matching `where`, grouped by `keys`: one row per group, its bucket
    counts summed in SQL."""
    counts = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in bounds]
    stmt = select(*keys, func.count(), func.coalesce(func.sum(seconds), 0.0), *counts).where(where).group_by(*keys)
    found = {}
    for row in session.execute(stmt):
        key, count, total, buckets = tuple(row[:len(keys)]), row[len(keys)], row[len(keys) + 1], row[len(keys) + 2:]
        found[key] = Histogram(tuple(zip(bounds, (int(n or 0) for n in buckets))), int(count), float(total))
    return found


def _empty(bounds: tuple[float, ...]) -> Histogram:
    return Histogram(tuple((bound, 0) for bound in bounds), 0, 0.0)


def job_stats(session: Session) -> JobStats:
    """The statistics of every job in the database, read in `session` (a handful of aggregate queries)."""
    counted = {(t, s): n for t, s, n in session.execute(
        select(Job.type, Job.status, func.count()).group_by(Job.type, Job.status))}
    jobs = {(t, s): int(counted.get((t, s), 0)) for t in JOB_TYPES for s in STATUSES}

    waited = histograms(session, seconds_between(session, Job.created_at, Job.started_at), [Job.type],
                        Job.started_at.is_not(None), QUEUE_WAIT_BUCKETS)
    queue_wait = {t: waited.get((t,), _empty(QUEUE_WAIT_BUCKETS)) for t in JOB_TYPES}

    ran = histograms(session, seconds_between(session, Job.started_at, Job.finished_at), [Job.type, Job.status],
                     and_(Job.started_at.is_not(None), Job.finished_at.is_not(None), Job.status.in_(TERMINAL)),
                     DURATION_BUCKETS)
    duration = {(t, s): ran.get((t, s), _empty(DURATION_BUCKETS)) for t in JOB_TYPES for s in sorted(TERMINAL)}

    trained = session.scalar(select(func.coalesce(func.sum(cast(Job.progress["tokens"].as_string(), BigInteger)), 0))
                             .where(Job.type.in_(TRAINING_TYPES)))
    generated = session.scalar(select(func.coalesce(
        func.sum(cast(GenerationResult.usage["completion_tokens"].as_string(), BigInteger)), 0)))
    takeovers = session.scalar(select(func.coalesce(func.sum(Job.workers_lost), 0)))
    return JobStats(jobs, queue_wait, duration, int(trained or 0), int(generated or 0), int(takeovers or 0))
