"""jobs.queue against real brokers: Redis at 127.0.0.1:6379 (a database of the session's own, see conftest) and
the filesystem transport."""
from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest

from jobs.queue import (
    DEFAULT_QUEUE,
    JOB_QUEUES,
    QUEUES,
    TASK_NAMES,
    BrokerUnavailable,
    broker_reachable,
    celery_config,
    enqueue,
    make_celery,
    queue_for,
    visibility_timeout,
    waiting_job_ids,
    worker_queues,
)
from jobs.settings import Settings

@pytest.fixture
def redis_settings(redis_url, tmp_path) -> Settings:
    return Settings.from_env({"BROKER_URL": redis_url,
                              "GPT2JOBS_VAR_DIR": str(tmp_path / "var")})


# --- routing and configuration ---------------------------------------------------------------------------

def test_routing():
    assert queue_for("train") == "train"
    assert queue_for("finetune") == "train"
    assert queue_for("generate") == "generate"
    assert set(JOB_QUEUES.values()) <= set(QUEUES)
    assert DEFAULT_QUEUE in QUEUES
    with pytest.raises(ValueError):
        queue_for("nope")


def test_a_job_on_several_devices_goes_to_the_queue_only_workers_with_as_many_consume():
    assert queue_for("train", 2) == queue_for("finetune", 2) == "train-2"
    assert queue_for("generate", 2) == "generate"  # generation spreads over workers by its shards
    assert worker_queues(1) == ("train", "generate")
    assert worker_queues(4) == ("train", "train-2", "train-3", "train-4", "generate")
    assert QUEUES == worker_queues(16) and "train-16" in QUEUES
    for bad in (0, 17):
        with pytest.raises(ValueError):
            queue_for("train", bad)


def test_task_routes_map_names_to_queues(redis_settings):
    app = make_celery(redis_settings)
    routes = app.conf.task_routes
    assert routes == {TASK_NAMES[t]: {"queue": JOB_QUEUES[t]} for t in TASK_NAMES}
    assert app.conf.task_default_queue == DEFAULT_QUEUE
    assert {q.name for q in app.conf.task_queues} == set(QUEUES)
    assert app.amqp.router.route({"queue": queue_for("train", 2)}, TASK_NAMES["train"])["queue"].name == "train-2"
    for job_type, name in TASK_NAMES.items():
        assert app.amqp.router.route({}, name)["queue"].name == JOB_QUEUES[job_type]


def test_redis_settings_for_long_jobs(redis_settings):
    app = make_celery(redis_settings, environ={})
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert conf.broker_connection_timeout and conf.broker_connection_timeout <= 10
    assert conf.task_publish_retry_policy["max_retries"] <= 3
    twelve_hours = 12 * 3600
    assert conf.broker_transport_options["visibility_timeout"] == twelve_hours
    assert conf.result_backend_transport_options["visibility_timeout"] == twelve_hours
    assert conf["visibility_timeout"] == twelve_hours


def test_visibility_timeout_from_env(redis_settings):
    conf = celery_config(redis_settings, {"VISIBILITY_TIMEOUT": "90000"})
    assert conf["broker_transport_options"]["visibility_timeout"] == 90000
    assert conf["result_backend_transport_options"]["visibility_timeout"] == 90000
    assert conf["visibility_timeout"] == 90000
    assert visibility_timeout({}) == 12 * 3600
    with pytest.raises(ValueError):
        visibility_timeout({"VISIBILITY_TIMEOUT": "0"})


def test_filesystem_transport_options(tmp_path):
    settings = Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path / "var")})
    assert settings.broker_url == "filesystem://"
    options = make_celery(settings).conf.broker_transport_options
    assert options["data_folder_in"] == options["data_folder_out"]
    for key in ("data_folder_in", "processed_folder", "control_folder"):
        folder = Path(options[key])
        assert folder.is_dir()
        assert settings.broker_folder.resolve() in folder.parents


# --- enqueue ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("job_type", sorted(TASK_NAMES))
def test_enqueue_to_redis_puts_name_and_id_on_the_queue_list(redis_settings, redis_client, queued_messages,
                                                            job_type):
    app = make_celery(redis_settings)
    job_id = f"job-{uuid.uuid4()}"
    enqueue(app, job_type, job_id)
    queue = JOB_QUEUES[job_type]
    [(headers, args)] = queued_messages(queue)
    assert headers["task"] == TASK_NAMES[job_type]
    assert args == [job_id]
    other = next(q for q in QUEUES if q != queue)
    assert redis_client.llen(other) == 0


def test_enqueue_with_filesystem_transport_writes_a_message_file(tmp_path):
    settings = Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path / "var")})
    app = make_celery(settings)
    enqueue(app, "generate", "job-fs-1")
    folder = Path(app.conf.broker_transport_options["data_folder_out"])
    files = sorted(folder.iterdir())
    assert [f.name.partition(".")[2] for f in files] == ["generate.msg"]
    message = json.loads(files[0].read_text())
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    assert message["headers"]["task"] == TASK_NAMES["generate"]
    assert json.loads(body)[0] == ["job-fs-1"]
    assert broker_reachable(app)


def test_enqueue_to_unreachable_broker_raises_broker_unavailable(tmp_path):
    settings = Settings.from_env({"BROKER_URL": "redis://127.0.0.1:1/0", "GPT2JOBS_VAR_DIR": str(tmp_path)})
    app = make_celery(settings)
    with pytest.raises(BrokerUnavailable):
        enqueue(app, "train", "job-unreachable")
    assert broker_reachable(app) is False


def test_broker_reachable_redis(redis_settings):
    assert broker_reachable(make_celery(redis_settings)) is True


def test_unknown_job_type_is_not_enqueued(redis_settings, redis_client):
    with pytest.raises(ValueError):
        enqueue(make_celery(redis_settings), "distill", "job-x")
    assert all(redis_client.llen(q) == 0 for q in QUEUES)


# --- what waits in the broker (the reconciliation's question) ---------------------------------------------


def test_waiting_job_ids_on_redis_lists_queued_messages_only(redis_settings, redis_client):
    app = make_celery(redis_settings)
    assert waiting_job_ids(app) == set()
    enqueue(app, "train", "job-a")
    enqueue(app, "generate", "job-b")
    enqueue(app, "finetune", "job-a")
    assert waiting_job_ids(app) == {"job-a", "job-b"}
    redis_client.lpush("train", b"not a celery message")  # something else on the list is ignored
    assert waiting_job_ids(app) == {"job-a", "job-b"}
    redis_client.delete("train")  # a purged queue, a broker restarted empty
    assert waiting_job_ids(app) == {"job-b"}
    enqueue(app, "train", "job-c", 2)  # a job on two devices waits in a queue of its own
    assert redis_client.llen("train-2") == 1 and waiting_job_ids(app) == {"job-b", "job-c"}


def test_waiting_job_ids_on_the_filesystem_broker(tmp_path):
    app = make_celery(Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path)}))
    enqueue(app, "train", "job-a")
    assert waiting_job_ids(app) == {"job-a"}
    for message in (tmp_path / "broker" / "messages").iterdir():  # taken by a worker
        message.rename(tmp_path / "broker" / "processed" / message.name)
    assert waiting_job_ids(app) == set()


def test_waiting_job_ids_is_none_when_the_broker_is_away(tmp_path):
    app = make_celery(Settings.from_env({"BROKER_URL": "redis://127.0.0.1:1/0", "GPT2JOBS_VAR_DIR": str(tmp_path)}))
    assert waiting_job_ids(app) is None


def test_a_broker_connection_loss_does_not_cancel_running_tasks(redis_settings):
    assert celery_config(redis_settings)["worker_cancel_long_running_tasks_on_connection_loss"] is False


def test_a_message_a_worker_just_took_counts_as_waiting_for_a_while(redis_settings, redis_client):
    app = make_celery(redis_settings)
    enqueue(app, "train", "job-taken")
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("train")
        message = queue.get(timeout=5)  # taken, not acknowledged: what a worker holds until its task ends
        assert waiting_job_ids(app) == set()  # not in the queue any more
        assert waiting_job_ids(app, taken_within=60) == {"job-taken"}  # ... but taken moments ago
        message.ack()
        assert waiting_job_ids(app, taken_within=60) == set()
        queue.close()
