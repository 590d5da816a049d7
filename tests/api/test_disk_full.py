"""A full disk (a real tmpfs, where mounting one is permitted) while the API stores an upload or extracts a model
archive: 507 insufficient_storage, nothing stored, nothing left behind (not a 500, nor a 400 blaming the archive)."""
from __future__ import annotations

import os

from tests.api.conftest import ApiHelper
from tests.api.test_models import checkpoint, tar_bytes
from tests.api.test_models import upload as import_archive


def test_an_upload_that_meets_a_full_disk_is_507_and_leaves_nothing(app, client, auth, tiny_disk):
    files = tiny_disk(app.extensions["gpt2jobs"].artifacts.root / "files", "256k")
    helper = ApiHelper(app, client)
    response = helper.upload(auth, b"Plenty of words to train on.\n" * 40_000)  # 1.2 MB
    assert response.status_code == 507, response.json
    assert response.json["error"]["code"] == "insufficient_storage"
    assert "nothing was stored" in response.json["error"]["message"]
    assert os.listdir(files) == []  # no temporary file either
    assert client.get("/v1/files", headers=auth).json["data"] == []
    assert helper.upload(auth, b"A small file still fits.\n" * 100).status_code == 201


def test_a_model_import_that_meets_a_full_disk_is_507_and_leaves_nothing(app, client, auth, tiny_disk):
    root = app.extensions["gpt2jobs"].artifacts.root
    scratch = tiny_disk(root / "tmp", "400k")  # the archive (gzip) fits; its 800 kB of weights do not
    response = import_archive(client, auth, tar_bytes(checkpoint()))
    assert response.status_code == 507, response.json
    assert response.json["error"]["code"] == "insufficient_storage"
    assert os.listdir(scratch) == [] and not any((root / "models").glob("*"))
    assert client.get("/v1/models", headers=auth).json["data"] == []
