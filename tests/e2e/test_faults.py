"""Fault injection with real processes (gunicorn, celery workers with docker-compose's commands) and private
Redis and PostgreSQL servers started by each test on free ports: nothing accepted is ever lost.

Slow (each test starts a stack); a developer may skip them locally with `-m "not faults"`; CI runs them all.
"""
from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ServiceProcess

from .conftest import Api, Stack
from .servers import PrivatePostgres, PrivateRedis
from .test_jobs_run import FINISHED, every, finished, submit, train_body, upload, wait_for

pytestmark = pytest.mark.faults

#: Short times, so that every recovery happens within seconds: a lease of 4 s (the sweeper runs every 2 s), a
#: lost message is sent again 5 s after the last one.
FAST = {"JOB_LEASE_SECONDS": "4", "JOB_REDISPATCH_SECONDS": "5", "GENERATION_SHARD_SIZE": "20"}


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def persistent_redis(tmp_path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis-aof", persistent=True)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.close()


def stack(launch, tmp_path: Path, database_url: str, broker_url: str, **settings: str) -> Stack:
    return Stack(launch, {"DATABASE_URL": database_url, "BROKER_URL": broker_url,
                          "ARTIFACT_DIR": str(tmp_path / "artifacts"), "GPT2JOBS_VAR_DIR": str(tmp_path / "var"),
                          **FAST, **settings})


def events_of(api: Api, job_id: str) -> list[str]:
    return [e["message"] for e in every(api, f"/v1/jobs/{job_id}/events")]


def holder(workers: list[ServiceProcess], job_id: str, attempt: int, timeout: float = 120) -> ServiceProcess:
    """The worker that logged starting attempt `attempt` of the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            if f"job {job_id}: train, attempt {attempt}" in worker.output():
                return worker
        time.sleep(0.1)
    raise AssertionError(f"no worker started attempt {attempt} of {job_id}")


def generate_file(api: Api, tmp_path: Path, count: int) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"item-{i}", "prompt": f"Prompt {i} is"}) + "\n"
                            for i in range(count)))
    with path.open("rb") as handle:
        return api.post("/v1/files", files={"file": (path.name, handle)}, data={"purpose": "generate"}).json()["id"]


def check_results_exactly_once(api: Api, job_id: str, count: int) -> None:
    results = [json.loads(line) for line in api.get(f"/v1/jobs/{job_id}/results.jsonl").text.splitlines()]
    assert [r["index"] for r in results] == list(range(count))
    assert [r["custom_id"] for r in results] == [f"item-{i}" for i in range(count)]
    assert all(r["error"] is None and r["completions"] for r in results)


# The broker


def test_redis_restarted_empty_with_jobs_queued_and_one_running(tmp_path, fresh_database_url, private_redis, launch):
    platform = stack(launch, tmp_path, fresh_database_url("postgresql"), private_redis.url)
    platform.migrate()
    platform.start_api()
    platform.start_worker("w1")
    api = platform.client("ada")
    file_id = upload(api, tmp_path)
    running = submit(api, train_body(file_id, 120, checkpoint_every=40, eval_every=40))
    wait_for(api, running["id"], lambda j: j["status"] == "running" and j["progress"]["step"] > 3)
    queued = [submit(api, train_body(file_id, 5))["id"] for _ in range(4)]
    assert private_redis.client().llen("train") == 4

    private_redis.restart()  # no persistence, as the shared Redis runs: every message is gone
    assert private_redis.client().llen("train") == 0

    for job_id in [running["id"], *queued]:
        finished(api, job_id, timeout=300)
    # The running job went on through the connection loss: one attempt, never resumed from a checkpoint.
    job = api.get(f"/v1/jobs/{running['id']}").json()
    assert job["attempts"] == 1 and not any("Resumed" in m for m in events_of(api, running["id"]))
    # Each lost message was sent again exactly once, although the jobs then waited behind the running one.
    for job_id in queued:
        resent = [m for m in events_of(api, job_id) if m.startswith("Sent to the queue again")]
        assert len(resent) == 1, events_of(api, job_id)


def test_a_two_second_redis_blip_does_not_stop_a_training_job(tmp_path, fresh_database_url, persistent_redis, launch):
    platform = stack(launch, tmp_path, fresh_database_url("postgresql"), persistent_redis.url)
    platform.migrate()
    platform.start_api()
    worker = platform.start_worker("w1")
    api = platform.client("bea")
    job = submit(api, train_body(upload(api, tmp_path), 150, checkpoint_every=50, eval_every=50))
    wait_for(api, job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] > 3)
    persistent_redis.restart(down_for=2.0)
    done, snapshots = finished(api, job["id"], timeout=300)
    assert done["attempts"] == 1 and done["progress"]["step"] == 150
    assert not any("Resumed" in m for m in events_of(api, job["id"]))
    steps = [s["progress"]["step"] for s in snapshots]
    assert steps == sorted(steps)
    assert "Connection to broker lost" in worker.output() or "Cannot connect" in worker.output()


# The database


def test_workers_started_while_postgres_is_down_run_every_queued_job(tmp_path, private_postgres, redis_url, redis_client, launch):
    platform = stack(launch, tmp_path, private_postgres.url, redis_url)
    platform.migrate()
    platform.start_api()
    api = platform.client("cy")
    file_id = upload(api, tmp_path)
    queued = [submit(api, train_body(file_id, 5))["id"] for _ in range(3)]

    private_postgres.stop()
    worker = platform.start_worker("w1")
    assert worker.wait_for("database or broker unreachable", 60), worker.output()
    time.sleep(3)
    private_postgres.start()
    for job_id in queued:
        job, _ = finished(api, job_id, timeout=240)
        assert job["attempts"] == 1
        # The messages the worker was putting back were never joined by second ones.
        assert not any(m.startswith("Sent to the queue again") for m in events_of(api, job_id)), events_of(api, job_id)


def test_postgres_down_20_s_while_clients_submit_and_a_job_trains(tmp_path, private_postgres, redis_url, redis_client, launch):
    platform = stack(launch, tmp_path, private_postgres.url, redis_url, JOB_MAX_ATTEMPTS="1")
    platform.migrate()
    platform.start_api()
    platform.start_worker("trainer", queues="train")
    platform.start_worker("generator", queues="generate")
    api = platform.client("dee")
    file_id = upload(api, tmp_path)
    model = finished(api, submit(api, train_body(file_id, 5))["id"])[0]["result"]["model"]
    # An outage far longer than the lease (4 s), with JOB_MAX_ATTEMPTS 1: taken for a lost worker, it would fail.
    training = submit(api, train_body(file_id, 400, checkpoint_every=100, eval_every=100, keep_checkpoints=10))
    wait_for(api, training["id"], lambda j: j["status"] == "running")

    acknowledged: list[str] = []
    answers: list[tuple[str, int, str, float]] = []
    stop = threading.Event()

    body = {"type": "generate", "model": model, "prompts": ["Once"], "sampling": {"max_new_tokens": 2}}

    def client() -> None:
        session = Api(api.base_url)
        session.headers.update(api.headers)
        while not stop.is_set():
            for method in ("POST", "GET"):
                started = time.monotonic()
                try:
                    if method == "POST":
                        response = session.post("/v1/jobs", json=body, timeout=30,
                                                headers={"Idempotency-Key": uuid.uuid4().hex})
                    else:
                        response = session.get(f"/v1/jobs/{acknowledged[-1] if acknowledged else 'job-none'}",
                                               timeout=30)
                except requests.RequestException as exc:
                    answers.append((method, 0, repr(exc), time.monotonic() - started))
                    continue
                code = response.json().get("error", {}).get("code", "") if response.status_code >= 400 else ""
                answers.append((method, response.status_code, code, time.monotonic() - started))
                if method == "POST" and response.status_code == 202:
                    acknowledged.append(response.json()["id"])
            time.sleep(0.3)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    private_postgres.stop()
    time.sleep(20)
    private_postgres.start()
    time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join(60)

    assert all(status != 0 for _, status, _, _ in answers), [a for a in answers if a[1] == 0][:5]
    assert all(status < 500 or (status == 503 and code == "database_unavailable") for _, status, code, _ in answers), \
        sorted({(m, s, c) for m, s, c, _ in answers})
    assert any(status == 503 for _, status, _, _ in answers), "the outage was never seen"
    assert max(seconds for *_, seconds in answers) < 20, "a request hung"
    assert api.get("/v1/jobs", params={"limit": 1}).status_code == 200  # recovered without a restart
    for job_id in acknowledged:
        finished(api, job_id, timeout=300)
    done, _ = finished(api, training["id"], timeout=300)
    assert done["progress"]["step"] == 400 and done["progress"]["total_steps"] == 400 and done["attempts"] == 1
    messages = events_of(api, training["id"])
    assert any(m.startswith("The database could not be reached for") for m in messages), messages
    assert not any("ended without a word" in m for m in messages)
    checkpoints = api.get(f"/v1/jobs/{training['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [100, 200, 300, 400]  # none recorded during the outage is lost


# Workers


def test_a_killed_worker_s_shards_are_done_by_another_exactly_once(tmp_path, fresh_database_url, redis_url, redis_client, launch):
    platform = stack(launch, tmp_path, fresh_database_url("postgresql"), redis_url)
    platform.migrate()
    platform.start_api()
    workers = [platform.start_worker("w1"), platform.start_worker("w2")]
    api = platform.client("eve")
    file_id = upload(api, tmp_path)
    model = finished(api, submit(api, train_body(file_id, 5))["id"])[0]["result"]["model"]
    job = submit(api, {"type": "generate", "model": model, "input_file": generate_file(api, tmp_path, 300),
                       "sampling": {"max_new_tokens": 24, "seed": 1}})
    wait_for(api, job["id"], lambda j: j["progress"]["completed"] >= 40)
    doomed = next(w for w in workers if "shard" in w.output())
    doomed.kill()
    done, _ = finished(api, job["id"], timeout=300)
    assert done["progress"] == {"total": 300, "completed": 300, "failed": 0}
    check_results_exactly_once(api, job["id"], 300)


def test_sigterm_hands_a_training_job_to_another_worker_at_once(tmp_path, fresh_database_url, redis_url, redis_client, launch):
    # A lease of 120 s: the job moves within seconds only because its worker hands it back, not by expiry.
    platform = stack(launch, tmp_path, fresh_database_url("postgresql"), redis_url, JOB_LEASE_SECONDS="120")
    platform.migrate()
    platform.start_api()
    workers = [platform.start_worker("w1"), platform.start_worker("w2")]
    api = platform.client("fay")
    job = submit(api, train_body(upload(api, tmp_path), 300, checkpoint_every=1000, eval_every=100))
    wait_for(api, job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] > 5)
    first = holder(workers, job["id"], 1)
    stopped_at = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(60) == 0, first.output()
    resumed = [m for m in events_of(api, job["id"]) if "stopped: the worker is shutting down" in m]
    assert len(resumed) == 1, events_of(api, job["id"])
    step = int(resumed[0].split("a checkpoint was saved at step ")[1].split(")")[0])
    second = holder(workers, job["id"], 2, timeout=30)
    assert second is not first and time.monotonic() - stopped_at < 60
    done, _ = finished(api, job["id"], timeout=300)
    assert done["attempts"] == 2 and done["progress"]["step"] == 300
    messages = events_of(api, job["id"])
    assert f"Resumed from the checkpoint at step {step}" in messages
    assert not any("ended without a word" in m for m in messages)


def test_a_job_that_kills_every_worker_fails_after_job_max_attempts(tmp_path, fresh_database_url, redis_url, redis_client, launch):
    platform = stack(launch, tmp_path, fresh_database_url("postgresql"), redis_url, JOB_MAX_ATTEMPTS="2")
    platform.migrate()
    platform.start_api()
    workers = [platform.start_worker(f"w{n}") for n in (1, 2, 3)]
    api = platform.client("gus")
    job = submit(api, train_body(upload(api, tmp_path), 100_000, checkpoint_every=1000))
    killed = []
    for attempt in (1, 2):
        victim = holder(workers, job["id"], attempt)
        wait_for(api, job["id"], lambda j, attempt=attempt: j["status"] == "running" and j["attempts"] == attempt)
        victim.kill()  # as the OOM killer would, every time the job runs
        killed.append(victim.name)
    failed, _ = wait_for(api, job["id"], lambda j: j["status"] in FINISHED, timeout=120)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost", failed
    lost = [e["data"] for e in every(api, f"/v1/jobs/{job['id']}/events") if e["message"].startswith("Attempt ")]
    assert [entry["attempt"] for entry in lost] == [1, 2]
    assert len({entry["worker"] for entry in lost}) == 2  # each attempt names its own worker
    survivor = next(w for w in workers if w.name not in killed)
    assert survivor.proc.poll() is None  # the poison job took two workers, not the third
