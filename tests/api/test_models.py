"""/v1/models: import (tar, tar.gz, zip), list, get, download, delete; unsafe and invalid archives."""
import io
import json
import math
import struct
import tarfile
import zipfile

import pytest

from gpt2core.checkpoint import parameter_count
from jobs import repository
from jobs.db import session_scope
from jobs.models import Model
from jobs.storage import StoredBlob

V, P, C, L, H = 50257, 8, 4, 1, 2  # GPT-2's vocabulary; the rest as small as it gets
CONFIG = {"model_type": "gpt2", "vocab_size": V, "n_positions": P, "n_embd": C, "n_layer": L, "n_head": H}
TINY_PARAMETERS = V * C + P * C + L * 244 + 2 * C  # 244 parameters per layer for C=4, I=16


def tensor_shapes(n_inner: int | None = None, prefix: str = "transformer.") -> dict[str, tuple[int, ...]]:
    """Every tensor GPT2LMHeadModel keeps for CONFIG, in Hugging Face's (Conv1D) layout."""
    inner = n_inner or 4 * C
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C), "wpe.weight": (P, C)}
    for i in range(L):
        shapes |= {f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,), f"h.{i}.attn.c_attn.weight": (C, 3 * C),
                   f"h.{i}.attn.c_attn.bias": (3 * C,), f"h.{i}.attn.c_proj.weight": (C, C),
                   f"h.{i}.attn.c_proj.bias": (C,), f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
                   f"h.{i}.mlp.c_fc.weight": (C, inner), f"h.{i}.mlp.c_fc.bias": (inner,),
                   f"h.{i}.mlp.c_proj.weight": (inner, C), f"h.{i}.mlp.c_proj.bias": (C,)}
    shapes |= {"ln_f.weight": (C,), "ln_f.bias": (C,)}
    return {prefix + name: shape for name, shape in shapes.items()}


def safetensors(wte_key="transformer.wte.weight", wte_shape=(V, C), n_inner=None) -> bytes:
    """A complete safetensors checkpoint of zeros for CONFIG (wte under `wte_key` with `wte_shape`)."""
    shapes = tensor_shapes(n_inner)
    del shapes["transformer.wte.weight"]
    if wte_key:
        shapes[wte_key] = wte_shape
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def pytorch_bin(n_inner=None) -> bytes:
    """The same checkpoint as torch.save writes pytorch_model.bin."""
    import torch

    buffer = io.BytesIO()
    torch.save({name: torch.zeros(shape) for name, shape in tensor_shapes(n_inner, prefix="").items()}, buffer)
    return buffer.getvalue()


def checkpoint(config=CONFIG, weights=None) -> dict[str, bytes]:
    files = {"config.json": json.dumps(config).encode()}
    files["model.safetensors"] = safetensors() if weights is None else weights
    return files


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz", prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with(extra: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in checkpoint().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.isreg() else None)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes], prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(prefix + name, data)
    return buffer.getvalue()


def upload(client, headers, content: bytes, filename: str = "model.tar.gz", **form):
    return client.post(
        "/v1/models",
        data={"file": (io.BytesIO(content), filename), **form},
        headers=headers,
        content_type="multipart/form-data",
    )


def artifact_leftovers(app) -> list[str]:
    root = app.extensions["gpt2jobs"].artifacts.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_parameter_count_formula():
    gpt2 = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12}
    assert parameter_count(gpt2) == 124_439_808
    assert parameter_count(CONFIG) == TINY_PARAMETERS
    assert parameter_count({**CONFIG, "n_inner": 8}) == TINY_PARAMETERS - 2 * C * 8 - 8


@pytest.mark.parametrize(
    "filename, build",
    [
        ("m.tar", lambda: tar_bytes(checkpoint(), "w")),
        ("m.tar.gz", lambda: tar_bytes(checkpoint(), "w:gz")),
        ("m.tgz", lambda: tar_bytes(checkpoint(), "w:gz", prefix="gpt2-tiny/")),
        ("m.tar", lambda: tar_bytes(checkpoint(), "w", prefix="./nested/")),
        ("m.zip", lambda: zip_bytes(checkpoint())),
        ("m.zip", lambda: zip_bytes(checkpoint(), prefix="gpt2-tiny/")),
    ],
)
def test_import_archive(app, client, auth, filename, build):
    response = upload(client, auth, build(), filename, name="tiny")
    assert response.status_code == 201, response.json
    body = response.json
    assert body["id"].startswith("model-") and body["object"] == "model"
    assert body["name"] == "tiny" and body["source"] == "import" and body["job_id"] is None
    assert body["config"] == CONFIG and body["parameter_count"] == TINY_PARAMETERS
    assert isinstance(body["created_at"], int)
    stored = app.extensions["gpt2jobs"].artifacts.model_dir(body["id"])
    assert sorted(p.name for p in stored.iterdir()) == ["config.json", "model.safetensors"]
    assert artifact_leftovers(app) == [f"models/{body['id']}/config.json", f"models/{body['id']}/model.safetensors"]


def test_import_pytorch_bin_and_short_wte_key_and_default_name(client, auth):
    files = {"config.json": json.dumps({**CONFIG, "n_inner": 8}).encode(), "pytorch_model.bin": pytorch_bin(8)}
    response = upload(client, auth, tar_bytes(files), "my-gpt2.tar.gz")
    assert response.status_code == 201, response.json
    assert response.json["name"] == "my-gpt2" and response.json["parameter_count"] == TINY_PARAMETERS - 72
    weights = safetensors(wte_key="wte.weight")
    response = upload(client, auth, zip_bytes(checkpoint(weights=weights)), "x.zip")
    assert response.status_code == 201, response.json


def test_get_list_and_paging(client, auth):
    ids = [upload(client, auth, tar_bytes(checkpoint()), name=f"m{i}").json["id"] for i in range(3)]
    got = client.get(f"/v1/models/{ids[0]}", headers=auth)
    assert got.status_code == 200 and got.json["id"] == ids[0] and got.json["name"] == "m0"

    listed = client.get("/v1/models", headers=auth).json
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ids[::-1]
    assert listed["has_more"] is False and listed["first_id"] == ids[2] and listed["last_id"] == ids[0]

    first = client.get("/v1/models?limit=2", headers=auth).json
    assert [m["id"] for m in first["data"]] == [ids[2], ids[1]] and first["has_more"] is True
    rest = client.get(f"/v1/models?limit=2&after={first['last_id']}", headers=auth).json
    assert [m["id"] for m in rest["data"]] == [ids[0]] and rest["has_more"] is False

    assert client.get("/v1/models?limit=0", headers=auth).status_code == 400
    assert client.get("/v1/models?after=model-unknown", headers=auth).json["error"]["param"] == "after"


def test_download_round_trips(client, auth):
    original = upload(client, auth, zip_bytes(checkpoint(), prefix="folder/"), "m.zip").json
    response = client.get(f"/v1/models/{original['id']}/download", headers=auth, buffered=False)
    assert response.status_code == 200 and response.is_streamed
    assert response.headers["Content-Disposition"] == f'attachment; filename="{original["id"]}.tar.gz"'
    content = b"".join(response.response)
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members == {f"{original['id']}/{name}": data for name, data in checkpoint().items()}

    again = upload(client, auth, content, f"{original['id']}.tar.gz")
    assert again.status_code == 201, again.json
    assert again.json["config"] == original["config"] and again.json["name"] == original["id"]
    assert again.json["parameter_count"] == original["parameter_count"]


def test_delete_then_404(app, client, auth):
    model_id = upload(client, auth, tar_bytes(checkpoint())).json["id"]
    response = client.delete(f"/v1/models/{model_id}", headers=auth)
    assert response.status_code == 200
    assert response.json == {"id": model_id, "object": "model", "deleted": True}
    assert not app.extensions["gpt2jobs"].artifacts.model_dir(model_id).exists()
    for call in (client.get, client.delete):
        missing = call(f"/v1/models/{model_id}", headers=auth)
        assert missing.status_code == 404 and missing.json["error"]["code"] == "not_found"
    assert client.get(f"/v1/models/{model_id}/download", headers=auth).status_code == 404


def test_delete_conflicts_while_an_unfinished_job_uses_the_model(app, client, auth, tmp_path):
    model_id = upload(client, auth, tar_bytes(checkpoint())).json["id"]
    with session_scope(app.extensions["gpt2jobs"].sessions) as session:
        model_owner = session.get(Model, model_id).owner
        blob = StoredBlob(path=tmp_path / "train.txt", bytes=5, sha256="0" * 64, lines=1)
        file = repository.create_file(session, model_owner, "train", "train.txt", blob, records=1)
        job, _ = repository.create_job(session, model_owner, "finetune", {}, training_file_id=file.id,
                                       base_model_id=model_id)
    response = client.delete(f"/v1/models/{model_id}", headers=auth)
    assert response.status_code == 409 and response.json["error"]["code"] == "conflict"
    assert app.extensions["gpt2jobs"].artifacts.model_dir(model_id).is_dir()
    assert client.get(f"/v1/models/{model_id}", headers=auth).status_code == 200

    with session_scope(app.extensions["gpt2jobs"].sessions) as session:
        repository.cancel_job(session, model_owner, job.id)
    assert client.delete(f"/v1/models/{model_id}", headers=auth).status_code == 200


def test_requests_without_a_key_are_401(client):
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models/model-abc").status_code == 401
    assert client.get("/v1/models/model-abc/download").status_code == 401
    assert client.delete("/v1/models/model-abc").status_code == 401
    response = upload(client, {}, tar_bytes(checkpoint()))
    assert response.status_code == 401 and response.json["error"]["code"] == "missing_api_key"


def test_other_owners_model_is_404(app, client, auth, other_auth):
    model_id = upload(client, auth, tar_bytes(checkpoint())).json["id"]
    for response in (
        client.get(f"/v1/models/{model_id}", headers=other_auth),
        client.get(f"/v1/models/{model_id}/download", headers=other_auth),
        client.delete(f"/v1/models/{model_id}", headers=other_auth),
    ):
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found"
    assert client.get("/v1/models", headers=other_auth).json["data"] == []
    assert app.extensions["gpt2jobs"].artifacts.model_dir(model_id).is_dir()


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


def regular(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 3
    return info


def zip_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in checkpoint().items():
            archive.writestr(name, data)
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def zip_with(name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in checkpoint().items():
            archive.writestr(member, data)
        archive.writestr(zipfile.ZipInfo(name), "evil")
    return buffer.getvalue()


BAD_ARCHIVES = {
    "not an archive": (b"just some text, definitely not an archive\n" * 40, "not a .tar"),
    "empty file": (b"", "not a .tar"),
    "missing config.json": (tar_bytes({"model.safetensors": safetensors()}), "no config.json"),
    "config not json": (tar_bytes(checkpoint() | {"config.json": b"{nope"}), "config.json: not valid JSON"),
    "config not an object": (tar_bytes(checkpoint() | {"config.json": b"[1]"}), "JSON object"),
    "wrong model_type": (tar_bytes(checkpoint({**CONFIG, "model_type": "llama"})), "model_type is 'llama'"),
    "bad n_embd": (tar_bytes(checkpoint({**CONFIG, "n_embd": "4"})), "n_embd must be a positive integer"),
    "n_embd vs n_head": (tar_bytes(checkpoint({**CONFIG, "n_head": 3})), "must be divisible by n_head (3)"),
    "missing weights": (tar_bytes({"config.json": json.dumps(CONFIG).encode()}), "missing weights file"),
    "wrong wte shape": (tar_bytes(checkpoint(weights=safetensors(wte_shape=(V + 1, C)))), "has shape [50258, 4], expected [50257, 4]"),
    "no wte tensor": (tar_bytes(checkpoint(weights=safetensors(wte_key="lm_head.weight"))), "lacks tensor wte.weight"),
    "safetensors garbage": (tar_bytes(checkpoint(weights=b"\xff" * 64)), "header"),
    "two top-level folders": (
        tar_bytes({"a/config.json": json.dumps(CONFIG).encode(), "b/model.safetensors": safetensors()}),
        "no config.json at its top level",
    ),
    "path traversal": (tar_with(regular("../evil")), "'..'"),
    "nested traversal": (tar_with(regular("sub/../../evil")), "'..'"),
    "absolute path": (tar_with(regular("/tmp/evil")), "absolute path"),
    "symlink": (tar_with(symlink("link", "/etc/passwd")), "is a link"),
    "hardlink": (tar_with(hardlink("hard", "config.json")), "is a link"),
    "device file": (tar_with(device("dev")), "not a regular file"),
    "zip traversal": (zip_with("../evil"), "'..'"),
    "zip absolute": (zip_with("/evil"), "absolute path"),
    "zip symlink": (zip_symlink(), "is a link"),
}


@pytest.mark.parametrize("case", BAD_ARCHIVES)
def test_bad_archives_are_400_and_leave_nothing(app, client, auth, case):
    content, message = BAD_ARCHIVES[case]
    response = upload(client, auth, content)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "invalid_model" and error["param"] == "file"
    assert message in error["message"]
    assert artifact_leftovers(app) == []
    root = app.extensions["gpt2jobs"].artifacts.root
    assert not any((root / "models").glob("*")) and not any((root / "tmp").glob("*"))
    assert client.get("/v1/models", headers=auth).json["data"] == []


def test_extracted_size_is_capped(app, client, auth):
    app.config["MAX_EXTRACTED_BYTES"] = 1000
    response = upload(client, auth, tar_bytes(checkpoint(weights=safetensors() + b"\0" * 2000)))
    assert response.status_code == 413 and response.json["error"]["param"] == "file"
    assert artifact_leftovers(app) == []


def test_not_multipart_is_415(client, auth):
    response = client.post("/v1/models", json={"file": "x"}, headers=auth)
    assert response.status_code == 415 and response.json["error"]["code"] == "unsupported_media_type"


def test_missing_file_is_400(client, auth):
    response = client.post("/v1/models", data={"name": "x"}, headers=auth, content_type="multipart/form-data")
    assert response.status_code == 400 and response.json["error"]["param"] == "file"


def test_gpt2core_checkpoint_imports_and_downloads_loadable(client, auth, tiny_model, tmp_path):
    """A checkpoint saved by gpt2core imports with the exact parameter count and loads again after download."""
    import torch

    from gpt2core import GPT2

    tiny_model.save_pretrained(tmp_path / "saved")
    files = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    response = upload(client, auth, tar_bytes(files, prefix="saved/"))
    assert response.status_code == 201, response.json
    expected = sum(p.numel() for n, p in tiny_model.named_parameters() if n != "lm_head.weight")
    assert response.json["parameter_count"] == expected

    content = client.get(f"/v1/models/{response.json['id']}/download", headers=auth).data
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        tar.extractall(tmp_path / "downloaded", filter="data")
    loaded = GPT2.from_pretrained(tmp_path / "downloaded" / response.json["id"]).eval()
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], tiny_model(tokens)[0])


def test_without_a_limit_the_list_holds_every_model_as_openais_does(helper, auth):
    # the openai SDK's client.models.list() reads one answer and never follows has_more
    ids = [helper.create_model(auth, name=f"m{i}") for i in range(25)]
    listed = helper.client.get("/v1/models", headers=auth).json
    assert [m["id"] for m in listed["data"]] == ids[::-1] and listed["has_more"] is False
    first = listed["data"][0]
    assert first["owned_by"] == helper.owner_of(auth) and first["created"] == first["created_at"]
    after = helper.client.get(f"/v1/models?after={ids[5]}", headers=auth).json
    assert [m["id"] for m in after["data"]] == ids[4::-1]
    assert len(helper.client.get("/v1/models?limit=20", headers=auth).json["data"]) == 20
