"""GET /v1/jobs/{id}/events as server-sent events, in process on both databases (the real-gunicorn stream test is
tests/e2e/test_event_stream_process.py)."""
from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import select

from jobs import repository
from jobs.models import ApiKey
from jobs.states import CANCELLED, CANCELLING, RUNNING, SUCCEEDED

STREAM = {"Accept": "text/event-stream"}


def parse_stream(chunks) -> list[dict]:
    """SSE messages as dicts {id, event, data (parsed JSON)}; `retry:` and comments are kept as their own keys."""
    messages, current = [], {}
    for line in "".join(chunks).split("\n"):
        if line == "":
            if current:
                messages.append(current)
            current = {}
        elif line.startswith(":"):
            current["comment"] = line[1:].strip()
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            current[field] = json.loads(value) if field == "data" else value
    return messages


def stream(client, url, headers, **extra) -> tuple[object, list[dict]]:
    response = client.get(url, headers={**headers, **STREAM, **extra})
    assert response.status_code == 200, response.data
    return response, parse_stream([response.get_data(as_text=True)])


def finished_job(helper, auth, messages=("one", "two")) -> tuple[str, list[int]]:
    job = helper.train_job(auth)
    ids = helper.add_events(job["id"], messages)
    helper.set_status(job["id"], RUNNING, SUCCEEDED)
    ids += helper.add_events(job["id"], ["Job succeeded"])
    return job["id"], ids


def test_a_finished_jobs_stream_sends_every_event_then_ends(helper, auth):
    job_id, ids = finished_job(helper, auth)
    response, messages = stream(helper.client, f"/v1/jobs/{job_id}/events", auth)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert messages[0] == {"retry": "2000"}
    listed = helper.client.get(f"/v1/jobs/{job_id}/events?limit=100", headers=auth).json["data"]
    events = [m for m in messages if "id" in m]
    # Every event, oldest first, each the same object as in the JSON list, its SSE id its event id.
    assert [m["data"] for m in events] == listed
    assert [int(m["id"]) for m in events] == [e["id"] for e in listed]
    assert set(ids) <= {e["id"] for e in listed}
    job_messages = [m for m in messages if m.get("event") == "job"]
    assert job_messages and job_messages[-1]["data"]["status"] == SUCCEEDED
    assert messages[-1]["event"] == "end" and messages[-1]["data"]["status"] == SUCCEEDED
    assert messages[-1]["data"]["id"] == job_id


def test_last_event_id_resumes_after_that_event(helper, auth):
    job_id, ids = finished_job(helper, auth, ["a", "b", "c", "d"])
    _, everything = stream(helper.client, f"/v1/jobs/{job_id}/events", auth)
    all_ids = [int(m["id"]) for m in everything if "id" in m]
    middle = all_ids[len(all_ids) // 2]
    _, resumed = stream(helper.client, f"/v1/jobs/{job_id}/events", auth, **{"Last-Event-ID": str(middle)})
    assert [int(m["id"]) for m in resumed if "id" in m] == [i for i in all_ids if i > middle]
    assert resumed[-1]["event"] == "end"
    _, by_query = stream(helper.client, f"/v1/jobs/{job_id}/events?after={middle}", auth)
    assert [m.get("id") for m in by_query] == [m.get("id") for m in resumed]
    _, after_last = stream(helper.client, f"/v1/jobs/{job_id}/events", auth, **{"Last-Event-ID": str(all_ids[-1])})
    assert [m for m in after_last if "id" in m] == [] and after_last[-1]["event"] == "end"


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999999999"])
def test_a_malformed_last_event_id_is_400(helper, auth, value):
    job_id, _ = finished_job(helper, auth)
    response = helper.client.get(f"/v1/jobs/{job_id}/events", headers={**auth, **STREAM, "Last-Event-ID": value})
    assert response.status_code == 400
    assert response.json["error"]["param"] == "Last-Event-ID"


def test_another_owners_job_is_404_before_any_stream(helper, auth, other_auth):
    job_id, _ = finished_job(helper, auth)
    response = helper.client.get(f"/v1/jobs/{job_id}/events", headers={**other_auth, **STREAM})
    assert response.status_code == 404 and response.json["error"]["code"] == "not_found"


def test_json_stays_the_default(helper, auth):
    job_id, _ = finished_job(helper, auth)
    for accept in (None, "*/*", "application/json", "application/json, text/event-stream;q=0.5"):
        response = helper.client.get(f"/v1/jobs/{job_id}/events", headers={**auth, **({"Accept": accept} if accept
                                                                                       else {})})
        assert response.status_code == 200 and response.json["object"] == "list", accept


def test_a_live_stream_sends_new_events_and_progress_as_they_happen(helper, auth):
    job = helper.train_job(auth)
    helper.set_status(job["id"], RUNNING)
    response = helper.client.get(f"/v1/jobs/{job['id']}/events", headers={**auth, **STREAM}, buffered=False)
    assert response.status_code == 200

    def worker() -> None:
        from jobs.models import Job

        for step in (1, 2):
            time.sleep(1.2)
            with helper.session() as session:
                session.get(Job, job["id"]).progress = {"step": step, "total_steps": 2}
            helper.add_events(job["id"], [f"step {step}"])
        time.sleep(1.2)
        helper.set_status(job["id"], SUCCEEDED)
        helper.add_events(job["id"], ["Job succeeded"])

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        messages = parse_stream(chunk.decode() if isinstance(chunk, bytes) else chunk for chunk in response.response)
    finally:
        thread.join()
        response.close()
    texts = [m["data"]["message"] for m in messages if "id" in m]
    assert texts[-3:] == ["step 1", "step 2", "Job succeeded"]
    updates = [m["data"] for m in messages if m.get("event") == "job"]
    steps = [job["progress"].get("step") for job in updates]
    assert {1, 2} <= set(steps) and steps == sorted(steps)  # each progress change, in order
    assert [job["status"] for job in updates][-1] == SUCCEEDED
    assert messages[-1]["event"] == "end"


def test_streams_per_process_are_bounded_and_freed(make_app, auth):
    from tests.api.conftest import ApiHelper, new_key

    app = make_app(EVENT_STREAMS=1)
    helper = ApiHelper(app, app.test_client())
    auth = new_key(app, "streams-owner")
    job = helper.train_job(auth)
    helper.set_status(job["id"], RUNNING)
    url = f"/v1/jobs/{job['id']}/events"
    first = helper.client.get(url, headers={**auth, **STREAM}, buffered=False)
    assert first.status_code == 200
    refused = helper.client.get(url, headers={**auth, **STREAM})
    assert refused.status_code == 503 and refused.json["error"]["code"] == "too_many_streams"
    assert int(refused.headers["Retry-After"]) > 0
    # Plain requests are not streams: they still answer.
    assert helper.client.get(url, headers=auth).status_code == 200
    first.close()  # the watcher went away: its slot is free again
    helper.set_status(job["id"], CANCELLING, CANCELLED)
    again = helper.client.get(url, headers={**auth, **STREAM})
    assert again.status_code == 200 and parse_stream([again.get_data(as_text=True)])[-1]["event"] == "end"


def test_a_revoked_key_ends_its_open_streams(helper, auth, monkeypatch):
    import api.event_stream

    monkeypatch.setattr(api.event_stream, "KEY_CHECK_SECONDS", 0.5)
    job = helper.train_job(auth)
    helper.set_status(job["id"], RUNNING)
    response = helper.client.get(f"/v1/jobs/{job['id']}/events", headers={**auth, **STREAM}, buffered=False)
    chunks = iter(response.response)
    assert next(chunks)  # the stream is open
    owner = helper.owner_of(auth)
    with helper.session() as session:
        key_id = session.scalars(select(ApiKey.id).where(ApiKey.owner == owner)).one()
        repository.revoke_api_key(session, owner, key_id)
    started = time.monotonic()
    rest = list(chunks)  # ends by itself although the job still runs
    response.close()
    assert time.monotonic() - started < 10
    assert not any("event: end" in (c.decode() if isinstance(c, bytes) else c) for c in rest)
    assert helper.client.get(f"/v1/jobs/{job['id']}/events", headers={**auth, **STREAM}).status_code == 401
