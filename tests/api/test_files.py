"""/v1/files: upload (checked line by line), list with paging, fetch, download and delete."""
import hashlib
import io

import pytest

from tests.api.conftest import GENERATE_JSONL, TRAIN_TEXT, ApiHelper


def assert_error(response, status: int, code: str, param):
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code and response.json["error"]["param"] == param, response.json
    return response.json["error"]["message"]


@pytest.fixture
def kept(helper, auth):
    """A file stored before a refused upload: afterwards it is still there, untouched, and nothing was added."""
    file = helper.upload_file(auth, filename="kept.txt")
    yield file
    assert helper.client.get("/v1/files", headers=auth).json["data"] == [file]
    assert helper.client.get(f"/v1/files/{file['id']}/content", headers=auth).data == TRAIN_TEXT
    assert helper.artifact_files() == [f"files/{file['id']}"]


@pytest.mark.parametrize(
    "content, filename, purpose, records",
    [
        (TRAIN_TEXT, "story.txt", "train", 1),
        ("naïve café ☃\r\nno newline at the end".encode(), "unicode.txt", "train", 1),
        (b'{"text": "first"}\n\n{"text": "second", "source": "web"}\n{"text": ""}\n', "docs.jsonl", "train", 2),
        (GENERATE_JSONL, "prompts.jsonl", "generate", 2),
    ],
)
def test_upload_returns_the_stored_file(helper, auth, content, filename, purpose, records):
    response = helper.upload(auth, content, filename, purpose)
    assert response.status_code == 201, response.json
    file = response.json
    assert file["id"].startswith("file-") and file["object"] == "file"
    assert file["purpose"] == purpose and file["filename"] == filename and file["records"] == records
    assert file["bytes"] == len(content) and file["sha256"] == hashlib.sha256(content).hexdigest()
    assert isinstance(file["created_at"], int)
    assert helper.client.get(f"/v1/files/{file['id']}", headers=auth).json == file
    assert helper.artifact_files() == [f"files/{file['id']}"]


def test_content_is_the_exact_bytes_uploaded(helper, auth):
    content = "line one\r\nligne deux é\n\n  trailing spaces  ".encode()
    file = helper.upload_file(auth, content, "exact.txt")
    response = helper.client.get(f"/v1/files/{file['id']}/content", headers=auth)
    assert response.status_code == 200 and response.data == content
    assert "exact.txt" in response.headers["Content-Disposition"]


@pytest.mark.parametrize(
    "body, content_type",
    [
        ('{"purpose": "train"}', "application/json"),
        ("purpose=train", "application/x-www-form-urlencoded"),
        ("just text", "text/plain"),
        ("", None),
    ],
)
def test_upload_that_is_not_multipart_is_415(helper, auth, kept, body, content_type):
    response = helper.client.post("/v1/files", data=body, content_type=content_type, headers=auth)
    assert_error(response, 415, "unsupported_media_type", None)


@pytest.mark.parametrize("purpose", [None, "", "assistants", "TRAIN", "batch_output"])
def test_missing_or_invalid_purpose_is_400(helper, auth, kept, purpose):
    message = assert_error(helper.upload(auth, purpose=purpose), 400, "invalid_request", "purpose")
    assert "train, generate, fine-tune, batch" in message


def test_missing_file_is_400(helper, auth, kept):
    for data in ({"purpose": "train"}, {"purpose": "train", "file": (io.BytesIO(b"text"), "")}):
        response = helper.client.post("/v1/files", data=data, headers=auth, content_type="multipart/form-data")
        assert_error(response, 400, "invalid_request", "file")


@pytest.mark.parametrize("filename", ["x" * 252 + ".txt", "two\nlines.txt", "nul\x00.txt", "bell\x07.txt"])
def test_unstorable_file_names_are_400(helper, auth, kept, filename):
    assert_error(helper.upload(auth, filename=filename), 400, "invalid_request", "file")


def test_longest_file_name_is_kept(helper, auth):
    filename = "é" * 251 + ".txt"
    assert helper.upload_file(auth, filename=filename)["filename"] == filename


@pytest.mark.parametrize(
    "purpose, filename, content, message",
    [
        ("train", "bad.txt", b"fine\nalso fine\n\xff\xfe broken\n", "bad.txt: line 3: invalid UTF-8"),
        ("train", "bad.jsonl", b'{"text": "a"}\n\n{"text": \n', "bad.jsonl: line 3: invalid JSON"),
        ("train", "bad.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "bad.jsonl: line 2: JSON object has no \"text\" field"),
        ("train", "empty.txt", b"", "empty.txt: the file holds no text"),
        ("train", "deep.jsonl", b'{"text": "a"}\n' + b"[" * 100_000 + b"\n", "deep.jsonl: line 2: invalid JSON"),
        ("train", "big.jsonl", b'{"text": "a", "n": 1' + b"0" * 5000 + b"}\n", "big.jsonl: line 1: invalid JSON"),
        ("generate", "in.jsonl", b'{"custom_id": "a", "prompt": "x"}\n{"custom_id": "b", "prompt": "y"}\n'
                                 b'{"custom_id": "a", "prompt": "z"}\n', "line 3: repeats custom_id 'a' from line 1"),
        ("generate", "in.jsonl", b'{"custom_id": "a", "prompt": "x"}\n'
                                 b'{"custom_id": "b", "prompt": "y", "sampling": {"temperature": 9}}\n',
         "in.jsonl: line 2: sampling.temperature"),
        ("generate", "in.jsonl", b'{"custom_id": "a", "prompt": "x", "sampling": {"top_k": -1}}\n',
         "in.jsonl: line 1: sampling.top_k: Input should be greater than or equal to 0"),
        ("generate", "in.jsonl", b'{"custom_id": "a", "prompt": "x", "sampling": "hot"}\n',
         "in.jsonl: line 1: sampling: Input should be"),
        ("generate", "in.jsonl", b'{"custom_id": "a", "prompt": "x"}\n["a list"]\n', "line 2: expected a JSON object"),
        ("generate", "in.txt", b"a plain prompt\n", "in.txt: line 1: invalid JSON"),
    ],
)
def test_bad_lines_are_400_naming_the_first_bad_line(helper, auth, kept, purpose, filename, content, message):
    response = helper.upload(auth, content, filename, purpose)
    assert message in assert_error(response, 400, "invalid_file", "file")


def test_upload_over_the_size_limit_is_413_and_leaves_nothing(make_app, auth):
    small = make_app(MAX_UPLOAD_BYTES=64)
    helper = ApiHelper(small, small.test_client())
    exact = helper.upload_file(auth, b"x" * 63 + b"\n", "exact.txt")
    assert exact["bytes"] == 64

    for size in (65, 3 << 20):  # just over; and far over (the whole request is refused before it is read)
        response = helper.upload(auth, b"y" * size, "big.txt")
        assert_error(response, 413, "too_large", "file")
    assert [f["id"] for f in helper.client.get("/v1/files", headers=auth).json["data"]] == [exact["id"]]
    assert helper.artifact_files() == [f"files/{exact['id']}"]


def test_list_is_newest_first_and_filters_by_purpose(helper, auth):
    first = helper.upload_file(auth)["id"]
    second = helper.generation_file(auth)["id"]
    third = helper.upload_file(auth, filename="more.txt")["id"]

    listed = helper.client.get("/v1/files", headers=auth).json
    assert [f["id"] for f in listed["data"]] == [third, second, first] and listed["has_more"] is False
    train = helper.client.get("/v1/files?purpose=train", headers=auth).json["data"]
    assert [f["id"] for f in train] == [third, first]
    generate = helper.client.get("/v1/files?purpose=generate", headers=auth).json["data"]
    assert [f["id"] for f in generate] == [second]
    response = helper.client.get("/v1/files?purpose=weights", headers=auth)
    assert_error(response, 400, "invalid_request", "purpose")


def test_empty_list(helper, auth):
    listed = helper.client.get("/v1/files", headers=auth).json
    assert listed == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_paging_walks_every_file_once(helper, auth):
    ids = [helper.upload_file(auth, filename=f"f{i}.txt")["id"] for i in range(5)][::-1]

    pages = helper.walk("/v1/files", auth, limit=1)
    assert [page["data"][0]["id"] for page in pages] == ids
    assert [page["has_more"] for page in pages] == [True] * 4 + [False]

    pages = helper.walk("/v1/files", auth, limit=2)
    assert [[f["id"] for f in page["data"]] for page in pages] == [ids[:2], ids[2:4], ids[4:]]

    assert helper.client.get("/v1/files?limit=5", headers=auth).json["has_more"] is False
    assert helper.client.get("/v1/files?limit=4", headers=auth).json["has_more"] is True
    last = helper.client.get(f"/v1/files?after={ids[-1]}", headers=auth).json
    assert last["data"] == [] and last["has_more"] is False and last["first_id"] is None
    assert len(helper.client.get("/v1/files?limit=100", headers=auth).json["data"]) == 5


@pytest.mark.parametrize(
    "query, param",
    [
        ("limit=0", "limit"), ("limit=101", "limit"), ("limit=-1", "limit"), ("limit=abc", "limit"),
        ("limit=", "limit"), ("limit=1.5", "limit"), ("after=file-000000000000000000000000", "after"),
        ("after=", "after"),
    ],
)
def test_bad_paging_is_400_naming_the_parameter(helper, auth, query, param):
    helper.upload_file(auth)
    response = helper.client.get(f"/v1/files?{query}", headers=auth)
    assert response.status_code == 400 and response.json["error"]["param"] == param


def test_delete_then_404(helper, auth):
    file = helper.upload_file(auth)
    response = helper.client.delete(f"/v1/files/{file['id']}", headers=auth)
    assert response.status_code == 200
    assert response.json == {"id": file["id"], "object": "file", "deleted": True}
    assert helper.artifact_files() == []
    for method, url in (("get", ""), ("get", "/content"), ("delete", "")):
        response = getattr(helper.client, method)(f"/v1/files/{file['id']}{url}", headers=auth)
        assert "No file with id" in assert_error(response, 404, "not_found", None)
    assert helper.client.get("/v1/files", headers=auth).json["data"] == []


def test_unknown_file_is_404(helper, auth):
    for url in ("/v1/files/file-000000000000000000000000", "/v1/files/nonsense/content"):
        assert_error(helper.client.get(url, headers=auth), 404, "not_found", None)


@pytest.mark.parametrize("use", ["training_file", "validation_file", "input_file"])
def test_delete_is_409_while_an_unfinished_job_uses_the_file(helper, auth, use):
    if use == "input_file":
        file = helper.generation_file(auth)
        model = helper.create_model(auth)
        job = helper.submit_job(auth, {"type": "generate", "model": model, "input_file": file["id"]})
    else:
        file = helper.upload_file(auth)
        job = helper.train_job(auth, **{use: file["id"]})

    response = helper.client.delete(f"/v1/files/{file['id']}", headers=auth)
    assert job["id"] in assert_error(response, 409, "conflict", "file_id")
    assert helper.client.get(f"/v1/files/{file['id']}", headers=auth).json == file
    content = helper.client.get(f"/v1/files/{file['id']}/content", headers=auth).data
    assert hashlib.sha256(content).hexdigest() == file["sha256"]

    assert helper.client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json["status"] == "cancelled"
    assert helper.client.delete(f"/v1/files/{file['id']}", headers=auth).status_code == 200
    assert helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json[use] is None


def test_a_list_can_be_followed_while_its_items_are_deleted(helper, auth):
    # for f in client.files.list(): client.files.delete(f.id): the next page starts after a deleted file
    ids = [helper.upload_file(auth, b"some text", f"f{i}.txt")["id"] for i in range(5)]
    first = helper.client.get("/v1/files?limit=2", headers=auth).json
    for item in first["data"]:
        assert helper.client.delete(f"/v1/files/{item['id']}", headers=auth).status_code == 200
    rest = helper.client.get(f"/v1/files?limit=2&after={first['last_id']}", headers=auth).json
    assert [f["id"] for f in rest["data"]] == [ids[2], ids[1]] and rest["has_more"] is True
    oldest_first = helper.client.get(f"/v1/files?order=asc&after={first['data'][0]['id']}", headers=auth).json
    assert oldest_first["data"] == []
    model = helper.create_model(auth)
    newer = helper.create_model(auth)
    assert helper.client.delete(f"/v1/models/{newer}", headers=auth).status_code == 200
    assert [m["id"] for m in helper.client.get(f"/v1/models?after={newer}", headers=auth).json["data"]] == [model]
    # another owner cannot use the deleted item's place
    assert helper.client.get(f"/v1/files?after={ids[4]}", headers=helper_other(helper)).status_code == 400


def helper_other(helper) -> dict[str, str]:
    from tests.api.conftest import new_key

    return new_key(helper.app, "someone-else")


def test_a_multipart_field_the_server_does_not_have_is_refused(helper, auth):
    # the openai SDK's files.create(..., expires_after=...): refused, not silently ignored
    response = helper.client.post("/v1/files", data={"file": (io.BytesIO(b"text"), "a.txt"), "purpose": "train",
                                                     "expires_after[anchor]": "created_at"},
                                  headers=auth, content_type="multipart/form-data")
    assert response.status_code == 400 and response.json["error"]["param"] == "expires_after[anchor]"
    assert helper.client.get("/v1/files", headers=auth).json["data"] == []
