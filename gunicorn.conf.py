"""gunicorn's settings for the API (read from the working directory by `gunicorn 'api:create_app()'`, as in
docker-compose.yml, the Dockerfile and `python -m demo`). Options given on the command line override these.

Worker class: gthread. Live event streams (server-sent events) hold a connection open for minutes; a sync worker
would be tied up by one watcher, and gevent would need a cooperative database driver. With gthread each process
serves EVENT_STREAMS streams at once on their own threads (jobs.settings; the API answers 503 with Retry-After
beyond that, and each stream ends after EVENT_STREAM_SECONDS so the client reconnects), and REQUEST_THREADS more
threads that only plain requests can use, so watchers never starve the API. Capacity grows with WEB_WORKERS (or
more API containers behind a load balancer).

Prometheus (api.monitoring): each worker process records its requests' timings in files under
PROMETHEUS_MULTIPROC_DIR, and GET /metrics adds up every process's files, whichever process answers. The folder
must be known before prometheus_client is imported in a worker (workers import the app after the fork), so it
is set here, in the master: unless PROMETHEUS_MULTIPROC_DIR is given (one folder per gunicorn), a fresh private
one is made under the temporary directory and removed at exit. Stale files are removed at start, and a worker
that exits is marked dead.
"""
import os
import shutil
import tempfile
from pathlib import Path

from jobs.settings import Settings, integer_setting

_settings = Settings.from_env()

workers = integer_setting(os.environ, "WEB_WORKERS", 2)
worker_class = "gthread"
threads = _settings.event_streams + integer_setting(os.environ, "REQUEST_THREADS", 8)
# Slow uploads and long result downloads are fine under gthread; this is the worker's heartbeat limit.
timeout = 60
graceful_timeout = 10

PRIVATE_METRICS_PREFIX = "gpt2jobs-metrics-"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=PRIVATE_METRICS_PREFIX)


def on_starting(server):
    """Before any worker starts: no observations of an earlier run are counted."""
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()


def child_exit(server, worker):
    """A worker exited: its live gauges go (its counters and histograms still count)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the private folder made above (a folder given from outside stays)."""
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith(PRIVATE_METRICS_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)
