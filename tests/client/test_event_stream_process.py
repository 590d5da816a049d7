"""The live event stream on a real gunicorn (gunicorn.conf.py's gthread workers) with a real worker: a whole stream
read from submission to the end, resumed with Last-Event-ID, and the client's follow/wait on it."""
from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import httpx

from demo.local import free_port
from gpt2jobs_client import Client, Event, Job
from gpt2jobs_client import sse
from tests.e2e.conftest import Stack, corpus_file

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}
STREAM = {"Accept": "text/event-stream"}


def read_stream(url: str, key: str, **headers: str) -> tuple[httpx.Response, list[sse.ServerSentEvent]]:
    """A whole stream, until the server closes it."""
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {key}", **STREAM, **headers},
                      timeout=httpx.Timeout(60, read=30)) as response:
        assert response.status_code == 200, response.read()
        return response, list(sse.parse(response.iter_lines()))


def test_a_whole_stream_on_gunicorn_and_its_resumption(stack: Stack, tmp_path: Path):
    assert stack.api_url is not None
    key = stack.create_key(f"sse-{uuid.uuid4().hex[:8]}")
    with Client(stack.api_url, key) as client:
        training = client.files.upload(corpus_file(tmp_path), "train")
        job = client.jobs.create(type="train", training_file=training.id, model=TINY_MODEL, seed=3,
                                 hyperparameters={"max_steps": 30, "batch_size": 4, "eval_every": 10,
                                                  "checkpoint_every": 10})
        url = f"{stack.api_url}/v1/jobs/{job.id}/events"
        # Opened while the job is queued: the stream follows it to its end and then closes by itself.
        response, messages = read_stream(url, key)
        assert response.headers["content-type"].startswith("text/event-stream")

        events = [m for m in messages if m.event == "message"]
        listed = [e.raw for e in client.jobs.events(job.id)]
        assert [json.loads(m.data) for m in events] == listed  # every event, oldest first, the same objects
        assert [int(m.id or "") for m in events] == [e["id"] for e in listed]
        assert messages[-1].event == "end"
        final = json.loads(messages[-1].data)
        assert final["status"] == "succeeded" and final["id"] == job.id
        assert json.loads(events[-1].data)["message"] == "Job succeeded"  # the terminal event, then the end
        updates = [json.loads(m.data) for m in messages if m.event == "job"]
        steps = [u["progress"].get("step") or 0 for u in updates]
        assert steps == sorted(steps) and steps[-1] == 30
        assert [u["status"] for u in updates][0] in ("queued", "running") and updates[-1]["status"] == "succeeded"

        # Resumed after an event in the middle: exactly the rest, then the end.
        middle = int(events[len(events) // 2].id or "")
        _, resumed = read_stream(url, key, **{"Last-Event-ID": str(middle)})
        assert [int(m.id or "") for m in resumed if m.event == "message"] == [
            e["id"] for e in listed if e["id"] > middle]
        assert resumed[-1].event == "end"

        # The client follows the same stream.
        followed = list(client.jobs.stream(job.id))
        assert [e.id for e in followed if isinstance(e, Event)] == [e["id"] for e in listed]
        assert isinstance(followed[-1], Job) and followed[-1].status == "succeeded"


def test_client_wait_follows_a_running_job_through_the_stream(stack: Stack, tmp_path: Path):
    assert stack.api_url is not None
    with Client(stack.api_url, stack.create_key(f"sse-{uuid.uuid4().hex[:8]}")) as client:
        training = client.files.upload(corpus_file(tmp_path), "train")
        job = client.jobs.create(type="train", training_file=training.id, model=TINY_MODEL, seed=4,
                                 hyperparameters={"max_steps": 40, "batch_size": 4})
        seen: list[Job] = []
        done = client.jobs.wait(job.id, on_progress=seen.append)
        assert done.status == "succeeded" and seen[-1] == done
        steps = [s.progress.get("step") or 0 for s in seen]
        assert steps == sorted(steps) and steps[-1] == 40 and len(seen) >= 2
        followed = [e.id for e in client.jobs.events(job.id, follow=True)]
        assert followed == [e.id for e in client.jobs.events(job.id)]


def test_a_follower_outlasts_an_api_restart(stack: Stack, tmp_path: Path):
    """The API goes away for longer than the transport's own retries (a restart), and comes back on the same
    address: the follower waits, reconnects with Last-Event-ID and sees every event once, to the end."""
    assert stack.api_url is not None
    shared_url, port = stack.api_url, free_port()
    api = stack.start_api(port)
    url = f"http://127.0.0.1:{port}"
    stack.api_url = shared_url  # the module's other tests keep the first API
    with Client(url, stack.create_key(f"sse-{uuid.uuid4().hex[:8]}"), backoff_factor=0.2) as client:
        training = client.files.upload(corpus_file(tmp_path), "train")
        job = client.jobs.create(type="train", training_file=training.id, model=TINY_MODEL, seed=5,
                                 hyperparameters={"max_steps": 400, "batch_size": 4})
        seen: list[Event | Job] = []
        follower = threading.Thread(target=lambda: seen.extend(client.jobs.stream(job.id)))
        follower.start()
        deadline = time.monotonic() + 120
        while not any(isinstance(item, Job) and item.status == "running" for item in seen):
            assert time.monotonic() < deadline and follower.is_alive(), seen
            time.sleep(0.2)
        assert follower.is_alive(), "the job ended before the outage: nothing was tested"
        api.stop()
        time.sleep(8)  # well past the transport's retries (about 3 s at this backoff)
        api = stack.start_api(port)
        stack.api_url = shared_url
        follower.join(timeout=180)
        assert not follower.is_alive()
        events = [item.id for item in seen if isinstance(item, Event)]
        assert events == [e.id for e in client.jobs.events(job.id)]  # every event once, in order
        assert isinstance(seen[-1], Job) and seen[-1].status == "succeeded"
    api.stop()
