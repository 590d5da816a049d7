"""The `gpt2jobs` console script, run as a subprocess against a real stack (tests/client/conftest.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.local import free_port
from tests.e2e.conftest import Stack, corpus_file

GPT2JOBS = Path(sys.executable).parent / "gpt2jobs"
TINY_MODEL = json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32})


@pytest.fixture(scope="module")
def env(stack: Stack) -> dict[str, str]:
    assert stack.api_url is not None
    return {**os.environ, "GPT2JOBS_API_URL": stack.api_url, "GPT2JOBS_API_KEY": stack.create_key("cli"), "NO_COLOR": "1"}


def gpt2jobs(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(GPT2JOBS), *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok(env: dict[str, str], *args: str) -> str:
    done = gpt2jobs(env, *args)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def upload(env: dict[str, str], path: Path) -> str:
    uploaded = json.loads(ok(env, "files", "upload", str(path), "--purpose", "train", "--json"))
    assert uploaded["object"] == "file" and uploaded["purpose"] == "train" and uploaded["filename"] == path.name
    return uploaded["id"]


def tiny_model_archive(folder: Path) -> Path:
    """A .tar.gz of a small random GPT-2 in Hugging Face format, as `models import` takes."""
    import tarfile

    import torch

    from gpt2core import GPT2, GPT2Config

    torch.manual_seed(0)
    GPT2(GPT2Config(**json.loads(TINY_MODEL))).save_pretrained(folder / "tiny")
    archive = folder / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((folder / "tiny").iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def test_train_wait_generate_results_and_lists(env: dict[str, str], tmp_path: Path):
    file_id = upload(env, corpus_file(tmp_path))
    assert file_id in ok(env, "files", "list")

    train = gpt2jobs(env, "jobs", "create", "train", "--training-file", file_id, "--model", TINY_MODEL,
                     "--max-steps", "10", "--batch-size", "4", "--seed", "7", "--wait")
    assert train.returncode == 0, train.stderr
    assert "step 10/10" in train.stderr and " loss " in train.stderr and " succeeded: model model-" in train.stderr
    train_id = train.stdout.split()[0]
    train_job = json.loads(ok(env, "jobs", "get", train_id, "--json"))
    assert train_job["status"] == "succeeded" and train_job["hyperparameters"]["batch_size"] == 4
    model_id = train_job["result"]["model"]
    assert [m["id"] for m in lines(ok(env, "models", "list", "--json"))] == [model_id]

    generated = gpt2jobs(env, "jobs", "create", "generate", "--model", model_id, "--prompt", "A", "--prompt", "B",
                         "--max-new-tokens", "4", "--wait", "--json")
    assert generated.returncode == 0, generated.stderr
    job = json.loads(generated.stdout)  # exactly the finished job's JSON
    assert job["object"] == "job" and job["status"] == "succeeded" and job["progress"]["total"] == 2
    assert "prompts 2/2" in generated.stderr

    out = tmp_path / "results.jsonl"
    ok(env, "jobs", "results", job["id"], "-o", str(out))
    results = lines(out.read_text())
    assert [(r["index"], r["prompt"]) for r in results] == [(0, "A"), (1, "B")] and all(r["completions"] for r in results)

    listed = lines(ok(env, "jobs", "list", "--json"))
    assert [j["id"] for j in listed] == [job["id"], train_id] and all(j["object"] == "job" for j in listed)
    assert [j["id"] for j in lines(ok(env, "jobs", "list", "--type", "generate", "--json"))] == [job["id"]]
    events = lines(ok(env, "jobs", "events", train_id, "--json"))
    assert events and all(e["object"] == "job.event" for e in events)


def test_errors_print_the_api_message_and_exit_non_zero(env: dict[str, str]):
    missing = gpt2jobs(env, "jobs", "get", "job-doesnotexist")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("error: ") and "job-doesnotexist" in missing.stderr and "404 not_found" in missing.stderr

    invalid = gpt2jobs(env, "jobs", "create", "train", "--training-file", "file-x", "--max-steps", "1", "--json")
    assert invalid.returncode == 1 and "training_file" in invalid.stderr

    both = gpt2jobs(env, "jobs", "create", "train", "--training-file", "file-x", "--max-steps", "1", "--epochs", "1")
    assert both.returncode == 2 and "mutually exclusive" in both.stderr

    nowhere = gpt2jobs({**env, "GPT2JOBS_API_URL": f"http://127.0.0.1:{free_port()}"}, "files", "list")
    assert nowhere.returncode == 2 and "no answer from the API" in nowhere.stderr


@pytest.mark.parametrize("args", [
    ["jobs", "create", "train", "--training-file", "file-x", "--max-steps", "2", "--learning-rate", "nan"],
    ["jobs", "create", "train", "--training-file", "file-x", "--max-steps", "2", "--model", '{"n_layer": NaN}'],
    ["jobs", "create", "generate", "--model", "model-x", "--prompt", "Hi", "--temperature", "inf"],
    ["jobs", "create", "generate", "--model", "model-x", "--prompt", "Hi", "--top-p", "nan"],
    ["jobs", "create", "train", "--training-file", "file-x", "--max-steps", "2", "--batch-size", "lots"],
    ["jobs", "create", "train", "--training-file", "file-x", "--epochs", "inf"],
])
def test_numbers_json_cannot_carry_are_a_usage_error_not_a_traceback(env: dict[str, str], args: list[str]):
    done = gpt2jobs(env, *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Error: Invalid value" in done.stderr, done.stderr


def test_writing_to_a_folder_that_does_not_exist_is_an_error_message(env: dict[str, str], tmp_path: Path):
    file_id = upload(env, corpus_file(tmp_path, size=2000))
    done = gpt2jobs(env, "files", "download", file_id, "-o", str(tmp_path / "missing" / "x.txt"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and "missing" in done.stderr


def test_watch_a_failed_job_exits_1_with_its_error(env: dict[str, str], stack: Stack, tmp_path: Path):
    archive = tiny_model_archive(tmp_path)
    copy = json.loads(ok(env, "models", "import", str(archive), "--name", "doomed", "--json"))
    assert copy["name"] == "doomed" and copy["source"] == "import"
    # Its weights vanish from the server's disk: the worker cannot load the model and fails the job.
    for config in Path(stack.environment["GPT2JOBS_VAR_DIR"]).rglob("config.json"):
        if copy["id"] in str(config):
            config.unlink()
    job_id = ok(env, "jobs", "create", "generate", "--model", copy["id"], "--prompt", "A", "--max-new-tokens", "4").split()[0]
    watched = gpt2jobs(env, "jobs", "watch", job_id)
    assert watched.returncode == 1, watched.stderr
    error = json.loads(ok(env, "jobs", "get", job_id, "--json"))["error"]
    assert error["code"] == "model_not_found"
    assert f"error: job {job_id} failed: model_not_found: {error['message']}" in watched.stderr
    assert json.loads(ok(env, "models", "delete", copy["id"], "--json"))["deleted"] is True


def test_cancel_a_running_job_then_watch_exits_3(env: dict[str, str], tmp_path: Path):
    file_id = upload(env, corpus_file(tmp_path))
    job_id = ok(env, "jobs", "create", "train", "--training-file", file_id, "--model", TINY_MODEL,
                "--max-steps", "100000", "--batch-size", "1").split()[0]
    deadline = time.monotonic() + 60
    while json.loads(ok(env, "jobs", "get", job_id, "--json"))["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.5)
    cancelled = json.loads(ok(env, "jobs", "cancel", job_id, "--json"))
    assert cancelled["id"] == job_id and cancelled["status"] in ("cancelling", "cancelled")
    watched = gpt2jobs(env, "jobs", "watch", job_id, "--json")
    assert watched.returncode == 3, watched.stderr
    assert json.loads(watched.stdout)["status"] == "cancelled" and f"{job_id} cancelled" in watched.stderr


def running(env: dict[str, str], job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (status := json.loads(ok(env, "jobs", "get", job_id, "--json"))["status"]) == "queued":
        assert time.monotonic() < deadline, f"{job_id} never started"
        time.sleep(0.3)
    assert status == "running", status


def test_pause_resume_checkpoints_and_register_exit_4_while_paused(env: dict[str, str], tmp_path: Path):
    file_id = upload(env, corpus_file(tmp_path))
    train = ["jobs", "create", "train", "--training-file", file_id, "--model", TINY_MODEL, "--batch-size", "1"]
    # The stack's one worker (concurrency 1) trains `busy`, so the jobs submitted next stay queued.
    busy = ok(env, *train, "--max-steps", "100000", "--eval-every", "0").split()[0]
    running(env, busy)
    queued = ok(env, *train, "--max-steps", "3", "--eval-every", "0").split()[0]

    assert ok(env, "jobs", "pause", queued).split() == [queued, "paused"]
    watched = gpt2jobs(env, "jobs", "watch", queued, "--json")
    assert watched.returncode == 4, watched.stderr
    assert json.loads(watched.stdout)["status"] == "paused"
    assert f"{queued} paused at step 0/3" in watched.stderr and f"gpt2jobs jobs resume {queued}" in watched.stderr
    assert [j["id"] for j in lines(ok(env, "jobs", "list", "--status", "paused", "--json"))] == [queued]
    uneven = gpt2jobs(env, "jobs", "resume", queued, "--devices", "2")  # 1 window a step: it cannot split
    assert uneven.returncode == 1 and "[422 invalid_request]" in uneven.stderr and "devices" in uneven.stderr
    assert json.loads(ok(env, "jobs", "resume", queued, "--devices", "1", "--json"))["status"] == "queued"
    again = gpt2jobs(env, "jobs", "resume", queued)
    assert again.returncode == 1 and again.stdout == "" and "[409 conflict]" in again.stderr, again.stderr

    # The new hyperparameter options, as the API stores them (submitted, then cancelled while queued).
    auto = json.loads(ok(env, *train[:-2], "--batch-size", "auto", "--learning-rate", "auto", "--epochs", "auto",
                         "--eval-every", "5", "--early-stopping-patience", "2", "--select-model", "best",
                         "--devices", "2", "--json"))
    hyperparameters = auto["hyperparameters"]
    assert auto["devices"] == 2  # queued for a worker with 2 devices (this stack's has 1)
    split = json.loads(ok(env, *train[:-2], "--batch-size", "2", "--grad-accum-steps", "3", "--devices", "2", "--json"))
    assert (split["hyperparameters"]["batch_size"], split["hyperparameters"]["grad_accum_steps"]) == (2, 3)
    assert json.loads(ok(env, "jobs", "cancel", split["id"], "--json"))["status"] == "cancelled"
    assert (hyperparameters["batch_size"], hyperparameters["learning_rate"], hyperparameters["n_epochs"]) == ("auto",) * 3
    assert (hyperparameters["eval_every"], hyperparameters["early_stopping_patience"], hyperparameters["select_model"]) == (5, 2, "best")
    assert json.loads(ok(env, "jobs", "cancel", auto["id"], "--json"))["status"] == "cancelled"

    # A running job is pausing until its worker has written a checkpoint; watch exits 4 once it is paused.
    assert ok(env, "jobs", "pause", busy).split()[1] in ("pausing", "paused")
    watched = gpt2jobs(env, "jobs", "watch", busy)
    assert watched.returncode == 4 and f"{busy} paused at step " in watched.stderr, watched.stderr
    checkpoints = lines(ok(env, "jobs", "checkpoints", busy, "--json"))
    assert checkpoints and all(c["object"] == "job.checkpoint" and "val_accuracy" in c for c in checkpoints)
    shown = ok(env, "jobs", "checkpoints", busy).splitlines()
    assert shown[0].split() == ["ID", "STEP", "TRAIN", "LOSS", "VAL", "LOSS", "PERPLEXITY", "ACCURACY", "SIZE"]
    last = checkpoints[-1]
    assert len(shown) == len(checkpoints) + 1 and shown[-1].split()[:2] == [last["id"], str(last["step"])]

    model_id = ok(env, "jobs", "register-checkpoint", busy, last["id"], "--name", "cli-paused").strip()
    model = json.loads(ok(env, "models", "get", model_id, "--json"))
    assert (model["source"], model["job_id"], model["checkpoint_step"], model["name"]) == (
        "checkpoint", busy, last["step"], "cli-paused")
    assert json.loads(ok(env, "jobs", "register-checkpoint", busy, last["id"], "--json"))["id"] == model_id
    gone = gpt2jobs(env, "jobs", "register-checkpoint", busy, "ckpt-0123456789abcdef01234567")
    assert gone.returncode == 1 and "404 not_found" in gone.stderr

    # LoRA fine-tuning of the registered model (submitted, then cancelled); --lora-alpha alone is a usage error.
    lora = json.loads(ok(env, "jobs", "create", "finetune", "--model", model_id, "--training-file", file_id,
                         "--max-steps", "2", "--lora-rank", "4", "--lora-alpha", "8", "--json"))
    assert lora["method"]["type"] == "lora" and (lora["method"]["rank"], lora["method"]["alpha"]) == (4, 8)
    ok(env, "jobs", "cancel", lora["id"])
    alone = gpt2jobs(env, "jobs", "create", "finetune", "--model", model_id, "--training-file", file_id, "--lora-alpha", "8")
    assert alone.returncode == 2 and "--lora-alpha needs --lora-rank" in alone.stderr

    # With the worker free, the resumed job runs to its end; a paused job is cancelled at once.
    finished = gpt2jobs(env, "jobs", "watch", queued)
    assert finished.returncode == 0, finished.stderr
    assert ok(env, "jobs", "cancel", busy).split() == [busy, "cancelled"]
    refused = gpt2jobs(env, "jobs", "pause", busy)
    assert refused.returncode == 1 and "[409 conflict]" in refused.stderr
