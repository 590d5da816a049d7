"""docker-compose.yml agrees with the code: the settings it sets are ones the code reads, the commands name the
real app objects and queues, and the volumes it mounts are declared."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from jobs import queue
from jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
APP_SERVICES = ("migrate", "api", "worker", "flower")
#: Read by Settings.from_env with a default that is only right outside a container (a path under ./var).
REQUIRED_IN_CONTAINER = {"DATABASE_URL", "BROKER_URL", "ARTIFACT_DIR"}


class _RecordingEnv(dict):
    """A mapping that records every name looked up in it."""

    def __init__(self):
        super().__init__()
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def settings_env_vars() -> set[str]:
    env = _RecordingEnv()
    Settings.from_env(env)
    return env.read


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _option(argv: list[str], *names: str) -> str:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name:
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    raise AssertionError(f"none of {names} in {argv}")


def test_settings_reads_the_variables_we_expect():
    read = settings_env_vars()
    assert REQUIRED_IN_CONTAINER <= read


def test_every_service_exists(compose):
    assert set(compose["services"]) >= {"redis", "postgres", "migrate", "api", "worker", "flower"}
    assert compose["services"]["redis"]["image"].startswith("redis:7")
    assert compose["services"]["postgres"]["image"].startswith("postgres:15")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_environment_is_read_by_the_code(compose, name):
    env = _environment(compose["services"][name])
    known = settings_env_vars() | set(queue.ENV_VARS)
    assert set(env) <= known, f"{name} sets variables nothing reads: {sorted(set(env) - known)}"
    missing = REQUIRED_IN_CONTAINER - {k for k, v in env.items() if v}
    assert not missing, f"{name} does not set {sorted(missing)}"
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert env["BROKER_URL"].startswith("redis://redis:6379/")
    assert env["ARTIFACT_DIR"] == "/data/artifacts"


def test_app_services_build_one_image(compose):
    images = {compose["services"][name]["image"] for name in APP_SERVICES}
    assert len(images) == 1
    assert all("build" in compose["services"][name] for name in APP_SERVICES)


def test_api_command(compose):
    api = compose["services"]["api"]
    argv = _command(api)
    assert argv[0] == "gunicorn"
    assert argv[-1] == "api:create_app()"
    assert _option(argv, "--bind", "-b") == "0.0.0.0:8000"
    # Workers, worker class and threads come from gunicorn.conf.py (WEB_WORKERS, EVENT_STREAMS, REQUEST_THREADS):
    # an option here would override them and the settings would not take effect.
    for option in ("--workers", "-w", "--threads", "--worker-class", "-k", "--config", "-c"):
        assert option not in argv, option
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "redis" in api["depends_on"]


def test_worker_command_consumes_the_queues(compose):
    """No --queues: a worker consumes the queues of the jobs its devices fit (jobs.queue.worker_queues)."""
    worker = compose["services"]["worker"]
    argv = _command(worker)
    assert argv[:4] == ["celery", "-A", "workers", "worker"]
    assert "--queues" not in argv and "-Q" not in argv
    assert queue.worker_queues(1) == ("train", "generate")
    assert _option(argv, "--concurrency", "-c") == "1"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_flower_command(compose):
    argv = _command(compose["services"]["flower"])
    assert argv[:4] == ["celery", "-A", "workers", "flower"]
    assert _option(argv, "--port") == "5555"
    assert "--port=5555" in argv  # flower's tornado option parser rejects `--port 5555`


def test_migrate_command(compose):
    migrate = compose["services"]["migrate"]
    assert _command(migrate) == ["alembic", "upgrade", "head"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart") == "no"


def test_postgres_healthcheck_and_volume(compose):
    postgres = compose["services"]["postgres"]
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if not source.startswith((".", "/", "~")):  # a named volume, not a bind mount
                assert source in declared, f"{name} mounts undeclared volume {source!r}"
    for name in ("api", "worker"):
        mounts = compose["services"][name]["volumes"]
        assert "artifacts:/data/artifacts" in mounts, name


def test_cpu_override_drops_the_gpu_reservation():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!reset", lambda loader, node: ("!reset", loader.construct_scalar(node)))
    override = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), Loader=Loader)
    assert override["services"]["worker"]["deploy"][0] == "!reset"


def test_dockerfile_defaults_to_cpu_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text


def test_prometheus_scrapes_the_api_s_metrics_route(compose, tmp_path):
    prometheus = compose["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = dict(reversed(volume.split(":")[:2]) for volume in prometheus["volumes"])
    config_file = ROOT / mounts[_option(_command(prometheus), "--config.file")]
    (job,) = yaml.safe_load(config_file.read_text())["scrape_configs"]
    api_port = _option(_command(compose["services"]["api"]), "--bind", "-b").rsplit(":", 1)[1]
    assert job["static_configs"] == [{"targets": [f"api:{api_port}"]}]

    from api import create_app

    app = create_app(Settings.from_env({"GPT2JOBS_VAR_DIR": str(tmp_path), "DATABASE_URL": "sqlite:///:memory:",
                                        "BROKER_URL": "memory://"}))
    routes = {rule.rule: rule.endpoint for rule in app.url_map.iter_rules()}
    assert routes[job["metrics_path"]] == "monitoring.metrics"


def test_gunicorn_conf_sizes_threads_for_event_streams(monkeypatch, tmp_path):
    """gunicorn.conf.py (read from the working directory by every launcher): gthread workers with a thread per
    live event stream plus REQUEST_THREADS for plain requests."""
    import runpy

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # else the file would make one in this process
    monkeypatch.setenv("EVENT_STREAMS", "5")
    monkeypatch.setenv("REQUEST_THREADS", "3")
    monkeypatch.setenv("WEB_WORKERS", "4")
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert (conf["worker_class"], conf["threads"], conf["workers"]) == ("gthread", 8, 4)
    monkeypatch.setenv("REQUEST_THREADS", "0")
    with pytest.raises(ValueError, match="REQUEST_THREADS"):
        runpy.run_path(str(ROOT / "gunicorn.conf.py"))
