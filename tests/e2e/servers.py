"""Private Redis and PostgreSQL servers for fault-injection tests: each on a free port, in a temporary folder,
started, stopped, killed and restarted by the test, never touching the shared servers (../shared/services.md)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from demo.local import free_port


class PrivateRedis:
    """A redis-server of the test's own. `persistent` keeps its data across restarts (an append-only file), as
    a blip of a production broker would; without it, a restart comes back empty, as the shared one does."""

    def __init__(self, folder: Path, persistent: bool = False):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.folder, self.port, self.persistent = folder, free_port(), persistent
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.folder),
             "--logfile", str(self.folder / "redis.log"), *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "private redis did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the server and every connection to it vanish at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, down_for: float = 0.0) -> None:
        self.kill()
        time.sleep(down_for)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb into a temporary folder, run as the `postgres` user when the
    tests run as root, which PostgreSQL refuses to run as). `stop()` is a fast shutdown: every connection drops."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not on the PATH")
        # Its own folder under the system temp dir (pytest's is private to root, which the postgres user is not).
        folder = Path(tempfile.mkdtemp(prefix="gpt2jobs-postgres-"))
        self.folder, self.port = folder, free_port()
        self.data, self.socket_dir = folder / "data", folder / "socket"
        self.socket_dir.mkdir(parents=True)
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                pytest.skip("running as root without runuser: cannot start a private PostgreSQL")
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(folder, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run([*self._as_user, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"), "-w", "-t", "60", "-o",
                   f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])

    def stop(self) -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def close(self) -> None:
        subprocess.run([*self._as_user, "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)
