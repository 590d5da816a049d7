"""README.md's walkthrough, run as written against a live stack.

README.md marks its walkthrough with lines `<!-- walkthrough -->` ... `<!-- /walkthrough -->`. Between them, every
```bash block is one shell session, run in order (with `set -euo pipefail`) in an empty folder; every ```python
block runs with `python3` at its place in that session; unlabelled blocks are illustrations; the ```console
blocks are what a user runs in other terminals, and the test runs those commands itself: `alembic upgrade head`,
the gunicorn command with a free port added as `--bind`, and the celery worker, on the embedded default with
GPT2JOBS_VAR_DIR in a temporary folder. The shell gets the venv's scripts first on PATH, that GPT2JOBS_VAR_DIR and
`API` (the walkthrough reads `API=${API:-http://127.0.0.1:8000}`); nothing in the README is rewritten.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

from demo.local import free_port
from tests.conftest import REPO_ROOT, ServiceProcess, service_env, venv_command

README = REPO_ROOT / "README.md"
MARKERS = re.compile(r"^<!-- (/?)walkthrough -->[ \t]*$", re.M)
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", re.M | re.S)
#: What the console blocks may hold; the test does what each one means.
SERVER_COMMANDS = ("source", "export", "alembic", "gunicorn", "celery")
READY_TIMEOUT = 120
SCRIPT_TIMEOUT = 480


def walkthrough_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block between the walkthrough marker lines, in order."""
    marks = list(MARKERS.finditer(text))
    assert marks and [m.group(1) for m in marks] == ["", "/"] * (len(marks) // 2), \
        "README.md: walkthrough markers missing or unbalanced"
    blocks = []
    for begin, end in zip(marks[::2], marks[1::2]):
        blocks += FENCE.findall(text[begin.end():end.start()])
    return blocks


def console_commands(blocks: list[tuple[str, str]]) -> list[list[str]]:
    """The `$ ` lines of the console blocks, split as the shell would (comments dropped)."""
    return [shlex.split(line[2:], comments=True) for language, body in blocks if language == "console"
            for line in body.splitlines() if line.startswith("$ ")]


def shell_script(blocks: list[tuple[str, str]]) -> str:
    """The bash and python blocks as one bash script."""
    parts = ["set -euo pipefail"]
    for language, body in blocks:
        if language == "bash":
            parts.append(body)
        elif language == "python":
            assert "\nPYTHON\n" not in f"\n{body}", "a python block holds the heredoc's end marker"
            parts.append(f"python3 - <<'PYTHON'\n{body}PYTHON")
        else:  # server commands (console) and illustrations (no language, text) are not run here
            assert language in ("console", "text", ""), f"README.md walkthrough: is the ```{language} block to be run?"
    return "\n".join(parts) + "\n"


def only(commands: list[list[str]], program: str) -> list[str]:
    found = [argv for argv in commands if argv[0] == program]
    assert len(found) == 1, f"README.md walkthrough: expected one `{program}` command, found {found}"
    return found[0]


def wait_ready(url: str, api: ServiceProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        assert api.proc.poll() is None, api.output()
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.3)
    raise AssertionError(f"the API never answered /readyz:\n{api.output()}")


def test_readme_walkthrough(launch, tmp_path):
    missing = [tool for tool in ("bash", "curl", "tar", "grep") if shutil.which(tool) is None]
    assert not missing, f"the README walkthrough calls {', '.join(missing)}: install them"
    blocks = walkthrough_blocks(README.read_text(encoding="utf-8"))
    commands = console_commands(blocks)
    assert {argv[0] for argv in commands} <= set(SERVER_COMMANDS), commands
    script = shell_script(blocks)

    var = tmp_path / "var"
    settings = {"GPT2JOBS_VAR_DIR": str(var)}  # what `export GPT2JOBS_VAR_DIR=...` does in every terminal
    migrate = subprocess.run(venv_command(only(commands, "alembic")), cwd=REPO_ROOT, env=service_env(settings),
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    port = free_port()
    gunicorn = only(commands, "gunicorn")
    assert "--bind" not in gunicorn  # the README's command listens on gunicorn's default address
    api = launch([*gunicorn, "--bind", f"127.0.0.1:{port}"], settings, "api")
    launch(only(commands, "celery"), settings, "worker")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, api)

    # The walkthrough's shell: the venv's scripts first on PATH (as `source .venv/bin/activate` does), the same
    # settings as the servers, and none of the variables the walkthrough sets itself.
    env = service_env({**settings, "API": url})
    for name in ("GPT2JOBS_API_URL", "GPT2JOBS_API_KEY", "KEY", "AUTH", "MODEL"):
        env.pop(name, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    folder = tmp_path / "walkthrough"
    folder.mkdir()
    (tmp_path / "walkthrough.sh").write_text(script)
    started = time.monotonic()
    done = subprocess.run(["bash", "-x", str(tmp_path / "walkthrough.sh")], cwd=folder, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=SCRIPT_TIMEOUT)
    out = done.stdout
    (tmp_path / "walkthrough.log").write_text(out)  # kept with pytest's temporary folders, to read after a run
    print(f"walkthrough: exit {done.returncode} in {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, f"the README walkthrough failed (exit {done.returncode}):\n{out[-20000:]}"

    # What a user would notice.
    assert (folder / "tiny-gpt2.tar.gz").is_file()
    statuses = re.findall(r"^(\d{3})$", out, re.M)  # the error examples print their status after the body
    assert statuses.count("409") == 2 and statuses.count("422") == 1, statuses
    assert re.search(r"^Results-Partial: (true|false)\r?$", out, re.M | re.I), out[-5000:]
    assert "event: end" in out
    assert re.search(r"^job-\w+ succeeded: model model-\w+$", out, re.M)  # `gpt2jobs jobs watch $TRAIN_JOB`
    assert re.search(r"^succeeded \{'completed': 2, 'failed': 0, 'total': 2\}$", out, re.M)  # the Python client
    assert re.search(r"^model-\w+ +pydoc-small-copy +import ", out, re.M)  # the trained model, imported again
    batch = list(folder.glob("job-*-results.jsonl"))
    assert len(batch) == 1 and [line.count('"custom_id"') for line in batch[0].read_text().splitlines()] == [1, 1]
    assert len((folder / "results.jsonl").read_text().splitlines()) == 2
    assert len(list(folder.glob("model-*.tar.gz"))) == 2  # the imported model and the trained one, downloaded
