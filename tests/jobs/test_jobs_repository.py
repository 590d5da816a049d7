"""Repository behaviour on SQLite and PostgreSQL (see conftest: every test runs on both)."""
from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from jobs import repository as repo
from jobs.db import session_scope
from jobs.errors import Conflict, InvalidInput, NotFound
from jobs.models import ApiKey, Checkpoint, File, GenerationResult, Job, JobEvent
from jobs.states import transition
from jobs.storage import StoredBlob


def blob(content: bytes = b'{"text": "hi"}\n') -> StoredBlob:
    return StoredBlob(path=Path("/artifacts/files/x"), bytes=len(content), sha256=hashlib.sha256(content).hexdigest(),
                      lines=content.count(b"\n"))


def new_file(sessions, owner: str, purpose: str = "train") -> str:
    with session_scope(sessions) as s:
        return repo.create_file(s, owner, purpose, "data.jsonl", blob(), records=1).id


def new_job(sessions, owner: str, **kwargs) -> str:
    kwargs.setdefault("training_file_id", new_file(sessions, owner))
    with session_scope(sessions) as s:
        job, created = repo.create_job(s, owner, "train", {"max_steps": 10}, **kwargs)
        assert created
        return job.id


def set_status(sessions, job_id: str, *path: str) -> None:
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        for status in path:
            transition(job, status)


def set_created_at(sessions, model, ids: list[str], when: datetime) -> None:
    with session_scope(sessions) as s:
        s.execute(update(model).where(model.id.in_(ids)).values(created_at=when))


# API keys


def test_api_key_create_authenticate_revoke(sessions, owner):
    with session_scope(sessions) as s:
        key, secret = repo.create_api_key(s, owner)
        key_id = key.id
    assert secret.startswith("sk-") and len(secret) >= 40
    assert key_id.startswith("key-") and key.prefix == secret[: len(key.prefix)]
    with session_scope(sessions) as s:
        stored = s.get(ApiKey, key_id)
        assert stored.key_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in (stored.key_hash, stored.prefix)
        assert repo.authenticate(s, secret) == owner
        assert repo.authenticate(s, secret + "x") is None
        assert repo.authenticate(s, "") is None
        assert [k.id for k in repo.list_api_keys(s, owner)] == [key_id]
    with session_scope(sessions) as s:
        revoked_at = repo.revoke_api_key(s, owner, key_id).revoked_at
        assert revoked_at is not None
    with session_scope(sessions) as s:
        assert repo.authenticate(s, secret) is None
        assert repo.revoke_api_key(s, owner, key_id).revoked_at == revoked_at  # idempotent


def test_api_keys_are_distinct_and_scoped_to_their_owner(sessions, owner, other_owner):
    with session_scope(sessions) as s:
        (mine, my_secret), (_, other_secret) = repo.create_api_key(s, owner), repo.create_api_key(s, other_owner)
        assert my_secret != other_secret
        assert repo.authenticate(s, other_secret) == other_owner
        with pytest.raises(NotFound):
            repo.revoke_api_key(s, other_owner, mine.id)
        assert [k.id for k in repo.list_api_keys(s, other_owner)] != [mine.id]


# Tenancy


def test_other_owners_ids_are_not_found(sessions, owner, other_owner):
    file_id = new_file(sessions, owner)
    job_id = new_job(sessions, owner, training_file_id=file_id)
    with session_scope(sessions) as s:
        model_id = repo.create_model(s, owner, "mine", "import", "/m", {"n_layer": 2}, 10).id
    with session_scope(sessions) as s:
        for call in (
            lambda: repo.get_file(s, other_owner, file_id),
            lambda: repo.delete_file(s, other_owner, file_id),
            lambda: repo.get_job(s, other_owner, job_id),
            lambda: repo.cancel_job(s, other_owner, job_id),
            lambda: repo.list_events(s, other_owner, job_id),
            lambda: repo.list_checkpoints(s, other_owner, job_id),
            lambda: repo.list_generation_results(s, other_owner, job_id),
            lambda: repo.get_model(s, other_owner, model_id),
            lambda: repo.delete_model(s, other_owner, model_id),
        ):
            with pytest.raises(NotFound) as raised:
                call()
            assert raised.value.code == "not_found"
        assert repo.list_files(s, other_owner) == ([], False)
        assert repo.list_jobs(s, other_owner) == ([], False)
        assert repo.list_models(s, other_owner) == ([], False)
        with pytest.raises(InvalidInput) as raised:  # another owner's id is no cursor either
            repo.list_jobs(s, other_owner, after=job_id)
        assert raised.value.param == "after"


def test_jobs_cannot_reference_other_owners_files_or_models(sessions, owner, other_owner):
    theirs = new_file(sessions, other_owner)
    with session_scope(sessions) as s:
        their_model = repo.create_model(s, other_owner, "theirs", "import", "/m", {}, 1).id
    with session_scope(sessions) as s:
        with pytest.raises(InvalidInput) as raised:
            repo.create_job(s, owner, "train", {}, training_file_id=theirs)
        assert raised.value.param == "training_file"
    mine = new_file(sessions, owner)
    with session_scope(sessions) as s:
        with pytest.raises(InvalidInput) as raised:
            repo.create_job(s, owner, "finetune", {}, training_file_id=mine, base_model_id=their_model)
        assert raised.value.param == "model"


def test_file_purpose_must_match_its_use(sessions, owner):
    generate_file = new_file(sessions, owner, purpose="generate")
    with session_scope(sessions) as s:
        with pytest.raises(InvalidInput) as raised:
            repo.create_job(s, owner, "train", {}, training_file_id=generate_file)
        assert raised.value.param == "training_file"
        with pytest.raises(InvalidInput):
            repo.create_file(s, owner, "bogus", "x", blob(), records=1)
        with pytest.raises(InvalidInput):
            repo.create_job(s, owner, "train", {})  # no training file
        job, _ = repo.create_job(s, owner, "generate", {"prompts": ["a"]}, input_file_id=generate_file)
        assert job.status == "queued" and job.attempts == 0 and job.metadata_ == {}


# Pagination


def test_pagination_walks_every_job_once_newest_first(sessions, owner):
    file_id = new_file(sessions, owner)
    ids = [new_job(sessions, owner, training_file_id=file_id) for _ in range(5)]
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i, job_id in enumerate(ids):
        set_created_at(sessions, Job, [job_id], base + timedelta(seconds=i))
    seen, after = [], None
    with session_scope(sessions) as s:
        while True:
            page, has_more = repo.list_jobs(s, owner, after=after, limit=2)
            seen += [j.id for j in page]
            if not has_more:
                break
            after = page[-1].id
        assert seen == ids[::-1]
        assert len(page) == 1
        page, has_more = repo.list_jobs(s, owner, limit=5)
        assert (len(page), has_more) == (5, False)
        page, has_more = repo.list_jobs(s, owner, limit=4)
        assert (len(page), has_more) == (4, True)
        assert repo.list_jobs(s, owner, after=ids[0]) == ([], False)  # the oldest: nothing after it


def test_pagination_is_stable_when_created_at_ties(sessions, owner):
    file_id = new_file(sessions, owner)
    ids = [new_job(sessions, owner, training_file_id=file_id) for _ in range(7)]
    set_created_at(sessions, Job, ids, datetime(2026, 1, 1, tzinfo=timezone.utc))
    seen, after = [], None
    with session_scope(sessions) as s:
        while True:
            page, has_more = repo.list_jobs(s, owner, after=after, limit=3)
            seen += [j.id for j in page]
            if not has_more:
                break
            after = page[-1].id
    assert seen == sorted(ids, reverse=True)


def test_pagination_of_files_ties_and_filters(sessions, owner):
    train = [new_file(sessions, owner, "train") for _ in range(3)]
    generate = [new_file(sessions, owner, "generate") for _ in range(2)]
    set_created_at(sessions, File, train + generate, datetime(2026, 1, 1, tzinfo=timezone.utc))
    with session_scope(sessions) as s:
        first, more = repo.list_files(s, owner, purpose="train", limit=2)
        rest, more_after = repo.list_files(s, owner, purpose="train", after=first[-1].id, limit=2)
        assert more and not more_after
        assert [f.id for f in first + rest] == sorted(train, reverse=True)
        everything, _ = repo.list_files(s, owner, limit=100)
        assert [f.id for f in everything] == sorted(train + generate, reverse=True)


def test_pagination_edges(sessions, owner):
    with session_scope(sessions) as s:
        assert repo.list_jobs(s, owner) == ([], False)
        assert repo.list_files(s, owner) == ([], False)
        assert repo.list_models(s, owner) == ([], False)
        for limit in (0, -1, repo.MAX_PAGE_SIZE + 1):
            with pytest.raises(InvalidInput) as raised:
                repo.list_jobs(s, owner, limit=limit)
            assert raised.value.param == "limit"
        with pytest.raises(InvalidInput) as raised:
            repo.list_jobs(s, owner, after="job-doesnotexist")
        assert raised.value.param == "after"
        with pytest.raises(InvalidInput):
            repo.list_jobs(s, owner, status="sleeping")


def test_list_jobs_filters_by_type_and_status(sessions, owner):
    queued = new_job(sessions, owner)
    running = new_job(sessions, owner)
    set_status(sessions, running, "running")
    with session_scope(sessions) as s:
        assert [j.id for j in repo.list_jobs(s, owner, status="running")[0]] == [running]
        assert [j.id for j in repo.list_jobs(s, owner, status="queued")[0]] == [queued]
        assert repo.list_jobs(s, owner, type="generate") == ([], False)
        assert {j.id for j in repo.list_jobs(s, owner, type="train")[0]} == {queued, running}


def test_timestamps_come_back_timezone_aware(sessions, owner):
    job_id = new_job(sessions, owner)
    with session_scope(sessions) as s:
        created_at = repo.get_job(s, owner, job_id).created_at
    assert created_at.tzinfo is not None and created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created_at) < timedelta(minutes=1)


# Idempotency


def test_same_idempotency_key_and_body_returns_the_original(sessions, owner):
    file_id = new_file(sessions, owner)
    body = {"training_file": file_id, "hyperparameters": {"max_steps": 10}}
    request_hash = repo.hash_request(body)
    assert request_hash == repo.hash_request(dict(reversed(list(body.items()))))
    with session_scope(sessions) as s:
        first, created = repo.create_job(s, owner, "train", {}, training_file_id=file_id,
                                         idempotency_key="abc", request_hash=request_hash)
        assert created
    with session_scope(sessions) as s:
        again, created_again = repo.create_job(s, owner, "train", {}, training_file_id=file_id,
                                               idempotency_key="abc", request_hash=request_hash)
        assert (again.id, created_again) == (first.id, False)
        assert len(repo.list_jobs(s, owner)[0]) == 1


def test_same_idempotency_key_with_another_body_conflicts(sessions, owner, other_owner):
    file_id = new_file(sessions, owner)
    with session_scope(sessions) as s:
        repo.create_job(s, owner, "train", {}, training_file_id=file_id, idempotency_key="k",
                        request_hash=repo.hash_request({"a": 1}))
    with session_scope(sessions) as s:
        with pytest.raises(Conflict) as raised:
            repo.create_job(s, owner, "train", {}, training_file_id=file_id, idempotency_key="k",
                            request_hash=repo.hash_request({"a": 2}))
        assert raised.value.param == "idempotency_key"
    other_file = new_file(sessions, other_owner)  # keys are per owner
    with session_scope(sessions) as s:
        _, created = repo.create_job(s, other_owner, "train", {}, training_file_id=other_file,
                                     idempotency_key="k", request_hash=repo.hash_request({"a": 2}))
        assert created


def test_concurrent_insert_with_the_same_key_returns_the_winner(sessions, owner, monkeypatch):
    """The unique constraint backs up the look-up: an insert that loses the race yields the original job."""
    file_id = new_file(sessions, owner)
    request_hash = repo.hash_request({"x": 1})
    with session_scope(sessions) as s:
        winner, _ = repo.create_job(s, owner, "train", {}, training_file_id=file_id, idempotency_key="race",
                                    request_hash=request_hash)
    find_idempotent, calls = repo._find_idempotent, []

    def miss_the_first_look_up(*args):
        calls.append(args)
        return None if len(calls) == 1 else find_idempotent(*args)

    monkeypatch.setattr(repo, "_find_idempotent", miss_the_first_look_up)
    with session_scope(sessions) as s:
        job, created = repo.create_job(s, owner, "train", {}, training_file_id=file_id,
                                       idempotency_key="race", request_hash=request_hash)
        assert (job.id, created, len(calls)) == (winner.id, False, 2)
        repo.add_event(s, job.id, "the transaction is still usable after the failed insert")
    with session_scope(sessions) as s:
        assert len(repo.list_jobs(s, owner)[0]) == 1
        assert repo.list_events(s, owner, winner.id)[0][-1].message.startswith("the transaction")


# Cancel


def test_cancel_queued_job_is_immediate(sessions, owner):
    job_id = new_job(sessions, owner)
    with session_scope(sessions) as s:
        job = repo.cancel_job(s, owner, job_id)
        assert job.status == "cancelled" and job.finished_at is not None
    with session_scope(sessions) as s:
        events, _ = repo.list_events(s, owner, job_id)
        assert "cancelled" in events[-1].message
        assert repo.get_job(s, owner, job_id).status == "cancelled"


def test_cancel_running_job_asks_the_worker(sessions, owner):
    job_id = new_job(sessions, owner)
    set_status(sessions, job_id, "running")
    with session_scope(sessions) as s:
        job = repo.cancel_job(s, owner, job_id)
        assert job.status == "cancelling" and job.finished_at is None
    with session_scope(sessions) as s:
        assert repo.cancel_job(s, owner, job_id).status == "cancelling"  # asking twice changes nothing


@pytest.mark.parametrize("path", [("running", "succeeded"), ("running", "failed"), ("cancelled",)])
def test_cancel_finished_job_conflicts(sessions, owner, path):
    job_id = new_job(sessions, owner)
    set_status(sessions, job_id, *path)
    with session_scope(sessions) as s:
        with pytest.raises(Conflict):
            repo.cancel_job(s, owner, job_id)


# Files in use


def test_delete_file_conflicts_while_an_unfinished_job_uses_it(sessions, owner):
    file_id = new_file(sessions, owner)
    validation_id = new_file(sessions, owner)
    job_id = new_job(sessions, owner, training_file_id=file_id, validation_file_id=validation_id)
    for status_path in ((), ("running",)):
        set_status(sessions, job_id, *status_path)
        with session_scope(sessions) as s:
            for used in (file_id, validation_id):
                with pytest.raises(Conflict):
                    repo.delete_file(s, owner, used)
    set_status(sessions, job_id, "succeeded")
    with session_scope(sessions) as s:
        deleted = repo.delete_file(s, owner, file_id)
        assert deleted.id == file_id
    with session_scope(sessions) as s:
        with pytest.raises(NotFound):
            repo.get_file(s, owner, file_id)
        assert repo.get_job(s, owner, job_id).training_file_id is None  # history keeps the job


def test_delete_model_conflicts_while_an_unfinished_job_builds_on_it(sessions, owner):
    with session_scope(sessions) as s:
        model_id = repo.create_model(s, owner, "base", "import", "/m", {"n_layer": 2}, 100).id
    job_id = new_job(sessions, owner, base_model_id=model_id)
    with session_scope(sessions) as s:
        with pytest.raises(Conflict):
            repo.delete_model(s, owner, model_id)
    with session_scope(sessions) as s:
        repo.cancel_job(s, owner, job_id)
    with session_scope(sessions) as s:
        assert repo.delete_model(s, owner, model_id).id == model_id
    with session_scope(sessions) as s:
        assert repo.list_models(s, owner) == ([], False)


# Events, checkpoints, models, generation results


def test_events_are_listed_oldest_first_after_a_cursor(sessions, owner):
    job_id = new_job(sessions, owner)
    with session_scope(sessions) as s:
        for step in range(4):
            repo.add_event(s, job_id, f"step {step}", type="metrics", data={"step": step, "loss": 1.0 / (step + 1)})
        repo.add_event(s, job_id, "disk almost full", level="warning")
    with session_scope(sessions) as s:
        first, more = repo.list_events(s, owner, job_id, limit=2)
        assert more and first[0].message.startswith("Created")
        rest, more_after = repo.list_events(s, owner, job_id, after=first[-1].id, limit=10)
        assert not more_after
        events = first + rest
        assert [e.id for e in events] == sorted(e.id for e in events)
        assert [e.data["step"] for e in events if e.type == "metrics"] == [0, 1, 2, 3]
        assert events[-1].level == "warning"
        assert repo.list_events(s, owner, job_id, after=events[-1].id) == ([], False)


def test_checkpoints_models_and_generation_results(sessions, owner):
    job_id = new_job(sessions, owner)
    with session_scope(sessions) as s:
        for step in (20, 10):
            s.add(Checkpoint(job_id=job_id, step=step, train_loss=2.0, val_loss=None, storage_path="/c", bytes=1))
        for index in range(5):
            s.add(GenerationResult(job_id=job_id, index=index, custom_id=f"c{index}", prompt="p",
                                   completions=[{"text": "t", "finish_reason": "length"}],
                                   usage={"prompt_tokens": 1, "completion_tokens": 4}))
        model = repo.create_model(s, owner, "trained", "job", "/models/m", {"n_layer": 2}, 1234, job_id=job_id)
        assert model.id.startswith("model-")
    with session_scope(sessions) as s:
        assert [c.step for c in repo.list_checkpoints(s, owner, job_id)] == [10, 20]
        page, more = repo.list_generation_results(s, owner, job_id, limit=2)
        assert [r.index for r in page] == [0, 1] and more
        page, more = repo.list_generation_results(s, owner, job_id, after=1, limit=10)
        assert [r.index for r in page] == [2, 3, 4] and not more
        assert page[0].completions[0]["finish_reason"] == "length" and page[0].error is None
        assert repo.get_model(s, owner, model.id).config == {"n_layer": 2}
        with pytest.raises(InvalidInput):
            repo.create_model(s, owner, "x", "stolen", "/m", {}, 1)


def test_a_job_event_row_needs_its_job(sessions):
    """Foreign keys are enforced on both backends (SQLite needs PRAGMA foreign_keys)."""
    with pytest.raises(IntegrityError):
        with session_scope(sessions) as s:
            s.add(JobEvent(job_id="job-missing", message="orphan"))
    with session_scope(sessions) as s:
        assert s.scalars(select(JobEvent).where(JobEvent.job_id == "job-missing")).all() == []
