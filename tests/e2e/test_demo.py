"""`python -m demo` as a user runs it: Ctrl-C in the middle of training cancels its jobs and stops every process it
started, and a rerun starts from nothing. (The whole demo runs in CI as README's first command does.)"""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, service_env

STARTUP_TIMEOUT = 300


def processes_with(var: Path) -> list[int]:
    """Live processes started with GPT2JOBS_VAR_DIR=<var>/demo (the demo's API and worker and their children)."""
    marker = f"GPT2JOBS_VAR_DIR={var / 'demo'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_demo(var: Path, *args: str) -> subprocess.Popen:
    env = service_env({"GPT2JOBS_VAR_DIR": str(var)})
    return subprocess.Popen([sys.executable, "-m", "demo", "--port", "0", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(process: subprocess.Popen, text: str, timeout: float) -> str:
    assert process.stdout is not None
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never came:\n{''.join(seen)}")


def jobs_in(var: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(var / "demo" / "gpt2jobs.db") as db:
        return db.execute("SELECT type, status FROM jobs ORDER BY created_at").fetchall()


def test_the_demo_runs_to_the_end_then_ctrl_c_cancels_a_rerun_that_starts_clean(tmp_path):
    # A whole run, left running for exploring: what it prints works.
    demo = start_demo(tmp_path, "--steps", "20", "--keep-running")
    try:
        output = read_until(demo, "press Ctrl-C", STARTUP_TIMEOUT + 600)
        url = re.search(r"GPT2JOBS_API_URL=(\S+)", output).group(1)
        key = re.search(r"GPT2JOBS_API_KEY=(\S+)", output).group(1)
        jobs = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        assert sorted((j["type"], j["status"]) for j in jobs) == [
            ("finetune", "succeeded"), ("generate", "succeeded"), ("train", "succeeded")]
        assert httpx.get(f"{url}/").status_code == 200  # the dashboard the output points to
        assert output.count(">>> ") == 5  # the generated texts
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, output + rest
    assert "Traceback" not in rest and "Stopped" in rest, rest
    assert processes_with(tmp_path) == []

    # A rerun starts from nothing (none of the first run's three jobs), and Ctrl-C in the middle of its training
    # cancels the job through the API and stops every process.
    rerun = start_demo(tmp_path, "--steps", "5000")
    try:
        before = read_until(rerun, "Training", STARTUP_TIMEOUT)
        assert "Platform up at http://127.0.0.1:" in before
        assert [status for _, status in jobs_in(tmp_path)] in (["queued"], ["running"])
        time.sleep(3)  # into the run
        assert processes_with(tmp_path), "the demo's API and worker run"
        rerun.send_signal(signal.SIGINT)
        output, _ = rerun.communicate(timeout=120)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    assert rerun.returncode == 130, output
    assert "Traceback" not in output, output
    assert "Cancelling the demo's unfinished job" in output and "Stopped" in output, output
    assert processes_with(tmp_path) == []
    assert jobs_in(tmp_path) == [("train", "cancelled")]


def test_a_platform_that_does_not_come_up_is_reported_and_cleaned_up(tmp_path):
    """A start-up that does not finish in time ends with a message (not a traceback) and leaves nothing running."""
    env = service_env({"GPT2JOBS_VAR_DIR": str(tmp_path)})
    done = subprocess.run([sys.executable, "-m", "demo", "--port", "0", "--start-timeout", "0"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "The platform did not start" in output and "Traceback" not in output, output
    assert processes_with(tmp_path) == []


def test_the_platforms_processes_die_with_a_killed_demo(tmp_path):
    """Even a demo killed with SIGKILL (no chance to clean up) leaves no process behind: each child it starts is
    sent SIGTERM by the kernel when the demo dies (PR_SET_PDEATHSIG)."""
    script = ("import sys, time; from pathlib import Path; from demo.local import LocalPlatform; "
              "p = LocalPlatform(Path(sys.argv[1])); p.logs.mkdir(parents=True); p.spawn('api', 'sleep', '300'); "
              "print(p.processes['api'].pid, flush=True); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "demo")], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        status = Path(f"/proc/{child}/status").read_text() if Path(f"/proc/{child}").exists() else ""
        if "\nState:\tZ" in status:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {child} outlived the demo that started it")
