"""POST /v1/jobs/{id}/checkpoints/{checkpoint_id}/model: a checkpoint registered as a model (jobs.checkpoint_models),
on SQLite and PostgreSQL. The checkpoint folders are real Hugging Face checkpoints written where a worker would."""
from __future__ import annotations

import shutil

import pytest
from sqlalchemy import delete

from jobs.models import Checkpoint

from .test_models import checkpoint as checkpoint_files


@pytest.fixture
def trained(helper, auth):
    """A training job with checkpoints at steps 10 and 20, their folders on disk; (job id, [checkpoint ids])."""
    job = helper.train_job(auth)["id"]
    ids = helper.add_checkpoints(job, [10, 20])
    folder = helper.platform.artifacts.checkpoint_dir(job)
    with helper.session() as session:
        for checkpoint_id, step in zip(ids, (10, 20)):
            row = session.get(Checkpoint, checkpoint_id)
            row.storage_path = str(folder / f"step-{step:06d}")
            (folder / f"step-{step:06d}").mkdir(parents=True)
            for name, data in {**checkpoint_files(), "trainer_state.pt": b"state"}.items():
                (folder / f"step-{step:06d}" / name).write_bytes(data)
    return job, ids


def register(helper, auth, job, checkpoint_id, **kwargs):
    return helper.client.post(f"/v1/jobs/{job}/checkpoints/{checkpoint_id}/model", headers=auth, **kwargs)


def test_a_checkpoint_becomes_a_model_once(helper, auth, trained):
    job, (first, _) = trained
    made = register(helper, auth, job, first)
    assert made.status_code == 201, made.json
    model = made.json
    assert (model["source"], model["job_id"], model["checkpoint_step"]) == ("checkpoint", job, 10)
    assert model["name"].endswith("@step-10") and made.headers["Location"] == f"/v1/models/{model['id']}"
    folder = helper.platform.artifacts.model_dir(model["id"])
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no trainer state
    again = register(helper, auth, job, first)
    assert again.status_code == 200 and again.json == model
    same_name = register(helper, auth, job, first, json={"name": model["name"]})
    assert same_name.status_code == 200 and same_name.json["id"] == model["id"]
    renamed = register(helper, auth, job, first, json={"name": "another name"})
    assert renamed.status_code == 409 and renamed.json["error"]["param"] == "name"
    assert model["id"] in renamed.json["error"]["message"]


def test_the_model_outlives_its_checkpoint(helper, auth, trained):
    job, (first, _) = trained
    model = register(helper, auth, job, first, json={"name": "kept"}).json
    with helper.session() as session:  # checkpoint retention removes the row and the folder
        path = session.get(Checkpoint, first).storage_path
        session.execute(delete(Checkpoint).where(Checkpoint.id == first))
    shutil.rmtree(path)
    again = register(helper, auth, job, first)
    assert again.status_code == 200 and again.json["id"] == model["id"]
    assert helper.client.get(f"/v1/models/{model['id']}/download", headers=auth).status_code == 200


def test_a_checkpoint_whose_files_are_gone_is_a_conflict(helper, auth, trained):
    job, (_, second) = trained
    with helper.session() as session:
        shutil.rmtree(session.get(Checkpoint, second).storage_path)
    gone = register(helper, auth, job, second)
    assert gone.status_code == 409 and gone.json["error"]["code"] == "checkpoint_gone"
    assert "/" not in gone.json["error"]["message"].replace("/v1/", "")  # no server path


@pytest.mark.parametrize("body,status,param", [
    ({"name": ""}, 422, "name"), ({"name": "   "}, 422, "name"), ({"name": "x" * 300}, 422, "name"),
    ({"name": "a\nb"}, 422, "name"), ({"name": 5}, 422, "name"), ({"name": "ok", "step": 3}, 422, "body"),
    (["ok"], 422, "body"),
])
def test_a_bad_body_names_what_is_wrong(helper, auth, trained, body, status, param):
    job, (first, _) = trained
    response = register(helper, auth, job, first, json=body)
    assert response.status_code == status and response.json["error"]["param"] == param, response.json


def test_other_bodies_and_ids_are_refused(helper, auth, trained):
    job, (first, _) = trained
    text = helper.client.post(f"/v1/jobs/{job}/checkpoints/{first}/model", data="name",
                              headers={**auth, "Content-Type": "text/plain"})
    assert text.status_code == 415 and "job" not in text.json["error"]["message"]
    assert register(helper, auth, job, "ckpt-" + "0" * 24).status_code == 404
    other_job = helper.train_job(auth)["id"]
    assert register(helper, auth, other_job, first).status_code == 404  # another job's checkpoint
