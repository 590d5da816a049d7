"""Issue 8 at the door: what the API accepts is what the workers run, every text comes back as sent, references
are safe under concurrency. On SQLite and PostgreSQL."""
from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs import repository
from jobs.models import Job, JobEvent
from sqlalchemy import select

from .conftest import new_key


def test_any_text_in_prompts_and_metadata_round_trips(helper, auth):
    """NUL, the private-use escape character, CR and control characters are text: stored and returned exactly."""
    texts = ["a\x00b", "\ue000", "\ue0000", "\ue000\x00\ue000", "\r\n\x1b[31m", "\x7f\x85\u2028", "😀\ufeff"]
    job = helper.submit_job(auth, {"type": "generate", "model": helper.create_model(auth), "prompts": texts,
                                   "sampling": {"stop": ["\x00", "\ue000"]},
                                   "metadata": {"k\x00": "v\x00", "e": "\ue000"}})
    again = helper.client.get(f"/v1/jobs/{job['id']}", headers=auth).json
    assert again["metadata"] == {"k\x00": "v\x00", "e": "\ue000"} and again["sampling"]["stop"] == ["\x00", "\ue000"]
    with helper.session() as session:
        assert session.get(Job, job["id"]).params["prompts"] == texts


def test_long_custom_id_is_refused_at_upload_not_after_the_work(helper, auth):
    """Input 2 of issue 8: a 300-character custom_id was accepted, then failed the finished job on PostgreSQL."""
    content = json.dumps({"custom_id": "c" * 300, "prompt": "Hello"}).encode()
    response = helper.upload(auth, content, "in.jsonl", "generate")
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_file"
    assert "line 1: custom_id must be at most 255 characters" in response.json["error"]["message"]
    ok = json.dumps({"custom_id": "c" * 255, "prompt": "Hello"}).encode()
    assert helper.upload(auth, ok, "in.jsonl", "generate").status_code == 201


def test_model_name_that_would_overflow_is_refused_at_submission(helper, auth):
    """Input 2 of issue 8: a fine-tune of a model named with 250 characters and suffix "ft-run" trained to the end,
    then failed registering its 257-character name."""
    model = helper.create_model(auth, name="m" * 250)
    train = helper.upload_file(auth)["id"]
    body = {"type": "finetune", "training_file": train, "model": model, "suffix": "ft-run"}
    response = helper.submit(auth, body)
    assert response.status_code == 422, response.json
    error = response.json["error"]
    assert error["code"] == "invalid_request" and error["param"] == "suffix" and "257 characters" in error["message"]
    response = helper.submit(auth, {**body, "suffix": None})  # the default suffix is 8 characters: 259
    assert response.status_code == 422 and response.json["error"]["param"] == "model"
    helper.submit_job(auth, {**body, "suffix": "ft"})  # 253 characters fit
    assert helper.client.get("/v1/jobs?type=finetune", headers=auth).json["data"][0]["suffix"] == "ft"


def test_generation_longer_than_the_models_context_is_refused(helper, auth):
    model = helper.create_model(auth)  # n_positions: 1024 (transformers' default)
    body = {"type": "generate", "model": model, "prompts": ["x"], "sampling": {"max_new_tokens": 1024}}
    response = helper.submit(auth, body)
    assert response.status_code == 422 and response.json["error"]["param"] == "sampling.max_new_tokens"
    helper.submit_job(auth, {**body, "sampling": {"max_new_tokens": 1023}})


def warnings_of(helper, job_id: str) -> list[str]:
    with helper.session() as session:
        return list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id,
                                                                   JobEvent.level == "warning")))


def test_settings_that_cannot_take_effect_are_warned_about(helper, auth):
    greedy = helper.generate_job(auth, sampling={"temperature": 0, "top_k": 40, "top_p": 0.9})
    assert warnings_of(helper, greedy["id"]) == [
        "temperature 0 is greedy decoding: top_k 40 has no effect",
        "temperature 0 is greedy decoding: top_p 0.9 has no effect"]
    train = helper.train_job(auth, hyperparameters={"max_steps": 50, "eval_every": 100, "checkpoint_every": 10})
    assert warnings_of(helper, train["id"]) == [
        "hyperparameters.eval_every 100 is more than max_steps 50: only the final evaluation will run"]
    assert warnings_of(helper, helper.generate_job(auth)["id"]) == []


def test_model_names_are_checked_at_import(helper, auth, tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    archive = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for path in (tmp_path / "m").iterdir():
            tar.add(path, arcname=path.name)
    for name, message in (("x" * 256, "at most 255"), ("tab\there", "control characters")):
        response = helper.client.post("/v1/models", headers=auth, content_type="multipart/form-data",
                                      data={"file": (io.BytesIO(archive.getvalue()), "m.tar.gz"), "name": name})
        assert response.status_code == 400 and response.json["error"]["param"] == "name", response.json
        assert message in response.json["error"]["message"]


def test_submit_while_deleting_never_500s_nor_queues_a_missing_file(app, helper, auth):
    """Input 6 of issue 8: 40 submissions racing the training file's delete gave 500s and jobs for a file that no
    longer existed. Now each submission either lands before the delete (which is then refused with 409) or
    after it (422/400: no such file); never both, never a 500."""
    owner = helper.owner_of(auth)
    for _ in range(3):
        file_id = helper.upload_file(auth)["id"]
        barrier = threading.Barrier(9)

        def submit(_, barrier=barrier, file_id=file_id):
            client = app.test_client()
            barrier.wait()
            return client.post("/v1/jobs", json={"type": "train", "training_file": file_id}, headers=auth)

        def delete(barrier=barrier, file_id=file_id):
            client = app.test_client()
            barrier.wait()
            statuses = []
            for _ in range(40):
                statuses.append(client.delete(f"/v1/files/{file_id}", headers=auth).status_code)
                if statuses[-1] == 200:
                    break
            return statuses

        with ThreadPoolExecutor(9) as pool:
            deleting = pool.submit(delete)
            answers = list(pool.map(submit, range(8)))
            delete_statuses = deleting.result()
        statuses = [r.status_code for r in answers]
        assert all(status in (202, 400) for status in statuses), [r.json for r in answers]
        assert all(status in (200, 409) for status in delete_statuses), delete_statuses
        with helper.session() as session:
            jobs = list(session.scalars(select(Job).where(Job.owner == owner, Job.training_file_id == file_id)))
            file_exists = repository.get_file(session, owner, file_id) is not None if 200 not in delete_statuses \
                else False
        assert len(jobs) == statuses.count(202)
        if 200 in delete_statuses:  # deleted: only after every job that got in was finished (none here: queued)
            assert not jobs and not file_exists
        for job in jobs:
            helper.client.post(f"/v1/jobs/{job.id}/cancel", headers=auth)
        helper.client.delete(f"/v1/files/{file_id}", headers=auth)


def test_another_owner_cannot_use_or_see_text(helper, auth, app):
    other = new_key(app, "someone-else")
    job = helper.generate_job(auth, prompts=["secret\x00"])
    assert helper.client.get(f"/v1/jobs/{job['id']}", headers=other).status_code == 404


def hf_archive(tmp_path, **config) -> bytes:
    """A tiny transformers GPT2LMHeadModel saved by transformers itself, as a .tar.gz."""
    import tarfile

    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(HFConfig(n_layer=1, n_head=2, n_embd=8, n_positions=16, **config))
    if config.get("vocab_size", 50257) != model.config.vocab_size:
        model.resize_token_embeddings(config["vocab_size"])
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in folder.iterdir():
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def import_archive(helper, auth, content: bytes):
    return helper.client.post("/v1/models", headers=auth, content_type="multipart/form-data",
                              data={"file": (io.BytesIO(content), "hf.tar.gz")})


def test_cross_attention_checkpoint_is_refused_at_import(helper, auth, tmp_path):
    """Input 3 of issue 8: a checkpoint with add_cross_attention imported (with a wrong parameter_count), then
    every job on it failed naming the server's artifact path."""
    response = import_archive(helper, auth, hf_archive(tmp_path, add_cross_attention=True))
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "invalid_model" and error["param"] == "file"
    assert error["message"] == "config.json: add_cross_attention=true is not supported (GPT-2 uses false)"
    assert helper.artifact_files() == []


def test_checkpoint_with_an_added_token_imports_and_counts_right(helper, auth, tmp_path):
    """Input 4 of issue 8, at the door: a 50,258-token checkpoint (a pad token added) imports, its parameters
    counted exactly; generation never samples the added id (tests/workers/test_contract_runs.py)."""
    response = import_archive(helper, auth, hf_archive(tmp_path, vocab_size=50258))
    assert response.status_code == 201, response.json
    C, V, P = 8, 50258, 16
    per_layer = 2 * C + 3 * C * C + 3 * C + C * C + C + 2 * C + 4 * C * C + 4 * C + 4 * C * C + C
    assert response.json["parameter_count"] == V * C + P * C + per_layer + 2 * C
    assert response.json["config"]["vocab_size"] == V


def test_training_file_too_small_for_the_model_is_refused_at_submission(helper, auth):
    """Found by a new user: a 47-training-token file with a 64-token context was accepted, then failed in the worker. The
    exact token count (counted at upload with the training reader) decides at the door."""
    tiny = helper.upload_file(auth, b"The cat sat. " * 12, "tiny.txt")  # 48 tokens + end-of-text
    body = {"type": "train", "training_file": tiny["id"], "model": {"n_layer": 1, "n_head": 1, "n_embd": 8,
                                                                    "block_size": 64}}
    response = helper.submit(auth, body)
    assert response.status_code == 422 and response.json["error"]["param"] == "training_file", response.json
    assert response.json["error"]["message"] == (
        "training_file: 'tiny.txt' gives 47 training tokens after the 5% held out for validation; training needs "
        "more than the model's context of 64")
    helper.submit_job(auth, {**body, "model": {**body["model"], "block_size": 46}})
    response = helper.submit(auth, {**body, "model": {**body["model"], "block_size": 47}})
    assert response.status_code == 422


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_archive_imported_iff_from_pretrained_loads(helper, auth, tmp_path_factory, data):
    """Random config changes and tensor sets: POST /v1/models answers 201 if and only if GPT2.from_pretrained loads
    the same folder; a refusal is a 400 naming the problem without a server path."""
    import tarfile

    import torch
    from safetensors.torch import save_file

    from gpt2core import GPT2, CheckpointError
    from tests.test_checkpoint_check import BASE, CONFIG_MUTATIONS, EXTRA_TENSORS, base_tensors

    config = {"model_type": "gpt2", **BASE}
    tensors = base_tensors(data.draw(st.sampled_from(["transformer.", ""])), data.draw(st.booleans()), 0)
    for field_, value, _ in data.draw(st.lists(st.sampled_from(CONFIG_MUTATIONS), max_size=2)):
        if value is KeyError:
            config.pop(field_, None)
        else:
            config[field_] = value
    for name, shape, _ in data.draw(st.lists(st.sampled_from(EXTRA_TENSORS), max_size=1)):
        tensors.setdefault(name, torch.zeros(shape))
    if data.draw(st.booleans()):
        del tensors[data.draw(st.sampled_from(sorted(tensors)))]
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    try:
        GPT2.from_pretrained(folder)
        loads = True
    except CheckpointError:
        loads = False
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in folder.iterdir():
            tar.add(path, arcname=path.name)
    response = import_archive(helper, auth, buffer.getvalue())
    assert response.status_code == (201 if loads else 400), response.json
    if not loads:
        assert response.json["error"]["code"] == "invalid_model" and "/tmp" not in response.json["error"]["message"]


def test_checkpoint_with_nan_weights_is_refused_at_import(helper, auth, tiny_model, tmp_path):
    """Found by a new user: NaN weights imported with 201, then generation wrote token 0 forever and fine-tuning
    failed with internal_error. The check now reads the weights' values too."""
    import tarfile

    import torch

    with torch.no_grad():
        tiny_model.transformer.wte.weight[5] = float("inf")
    tiny_model.save_pretrained(tmp_path / "m")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in (tmp_path / "m").iterdir():
            tar.add(path, arcname=path.name)
    response = import_archive(helper, auth, buffer.getvalue())
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_model"
    assert response.json["error"]["message"].startswith("model.safetensors: tensor wte.weight holds NaN or infinite")


def test_metadata_is_bounded_and_results_say_their_charset(helper, auth):
    body = {"type": "generate", "model": helper.create_model(auth), "prompts": ["x"]}
    response = helper.submit(auth, {**body, "metadata": {"k" * 65: "v"}})
    assert response.status_code == 422 and response.json["error"]["param"].startswith("metadata"), response.json
    response = helper.submit(auth, {**body, "metadata": {"k": "v" * 513}})
    assert response.status_code == 422 and response.json["error"]["param"] == "metadata.k", response.json
    job = helper.submit_job(auth, {**body, "metadata": {"k" * 64: "v" * 512}})
    results = helper.client.get(f"/v1/jobs/{job['id']}/results.jsonl", headers=auth)
    assert results.headers["Content-Type"] == "application/x-ndjson; charset=utf-8"


def test_ambiguous_requests_are_refused_not_guessed(helper, auth):
    """Found by a new user: repeated multipart fields, a JSON key twice, NaN and non-ASCII idempotency keys were
    resolved silently or answered with misleading messages."""
    response = helper.client.post("/v1/files", headers=auth, content_type="multipart/form-data", data={
        "purpose": ["train", "generate"], "file": (io.BytesIO(b"text " * 300), "a.txt")})
    assert response.status_code == 400 and response.json["error"]["param"] == "purpose", response.json
    response = helper.client.post("/v1/files", headers=auth, content_type="multipart/form-data", data={
        "purpose": "train", "file": [(io.BytesIO(b"a " * 600), "a.txt"), (io.BytesIO(b"b " * 600), "b.txt")]})
    assert response.status_code == 400 and response.json["error"]["param"] == "file", response.json
    train = helper.upload_file(auth)["id"]
    raw = '{"type": "train", "training_file": "%s", "type": "generate"}' % train
    response = helper.client.post("/v1/jobs", data=raw, content_type="application/json", headers=auth)
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_json"
    assert "key 'type' appears twice" in response.json["error"]["message"]
    raw = '{"type": "train", "training_file": "%s", "hyperparameters": {"learning_rate": NaN}}' % train
    response = helper.client.post("/v1/jobs", data=raw, content_type="application/json", headers=auth)
    assert response.status_code == 422 and response.json["error"]["param"] == "hyperparameters.learning_rate"
    assert "finite" in response.json["error"]["message"]
    raw = '{"type": "train", "training_file": "%s", "seed": %s}' % (train, "9" * 5000)
    response = helper.client.post("/v1/jobs", data=raw, content_type="application/json", headers=auth)
    assert response.status_code == 400 and "more than 4,300 digits" in response.json["error"]["message"]
    response = helper.submit(auth, {"type": "train", "training_file": train}, **{"Idempotency-Key": "ключ"})
    assert response.status_code == 400 and "printable ASCII" in response.json["error"]["message"]


def test_greedy_by_top_k_warns_too(helper, auth):
    job = helper.generate_job(auth, sampling={"temperature": 1.5, "top_k": 1, "n": 3})
    assert warnings_of(helper, job["id"]) == [
        "top_k 1 is greedy decoding: temperature 1.5 has no effect",
        "top_k 1 is greedy decoding: the n 3 completions of a prompt are identical"]
