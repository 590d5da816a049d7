"""GET /metrics from the API as production runs it: gunicorn with docker-compose's command (2 worker processes)
and the repository's gunicorn.conf.py. prometheus_client's multiprocess mode adds up every worker's requests,
whichever worker answers the scrape; the private folder it uses is removed when gunicorn exits."""
from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Stack

REQUESTS_TIMEOUT = 120


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (gunicorn's workers, for its master)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def metrics_files(pid: int) -> list[Path]:
    """The multiprocess files a process wrote in a private folder gunicorn.conf.py made."""
    return list(Path(tempfile.gettempdir()).glob(f"gpt2jobs-metrics-*/*_{pid}.db"))


def routes_served(pid: int) -> set[str | None]:
    """The routes a worker process recorded requests of (read from its own multiprocess files)."""
    routes: set[str | None] = set()
    for path in metrics_files(pid):
        for key, _value, _timestamp, _position in MmapedDict.read_all_values_from_file(str(path)):
            _metric, _name, labels, _help = json.loads(key)  # prometheus_client.mmap_dict.mmap_key
            routes.add(labels.get("route"))
    return routes


def request_counts(base_url: str) -> dict[tuple[str, str], float]:
    """(route, status) -> requests counted, from one scrape."""
    response = requests.get(f"{base_url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    counts = {}
    for family in text_string_to_metric_families(response.text):
        if family.name == "gpt2jobs_http_request_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    counts[(sample.labels["route"], sample.labels["status"])] = sample.value
    return counts


def test_every_worker_process_s_requests_add_up_in_one_scrape(launch, tmp_path):
    stack = Stack(launch, {"GPT2JOBS_VAR_DIR": str(tmp_path / "var")})
    stack.migrate()
    key = stack.create_key("alice")
    api = stack.start_api()
    assert stack.api_url is not None
    deadline = time.monotonic() + REQUESTS_TIMEOUT
    while len(children(api.proc.pid)) < 2:
        assert time.monotonic() < deadline, api.output()
        time.sleep(0.1)
    workers = children(api.proc.pid)
    requests_to = [("/healthz", {}, "/healthz", "200"), ("/v1/jobs", {"Authorization": f"Bearer {key}"}, "/v1/jobs", "200"),
                   ("/v1/jobs/job-missing", {"Authorization": f"Bearer {key}"}, "/v1/jobs/<job_id>", "404"),
                   ("/no-such-route", {}, "<unmatched>", "404")]

    def send(number: int) -> tuple[str, str]:
        path, headers, route, status = requests_to[number % len(requests_to)]
        response = requests.get(stack.api_url + path, headers=headers, timeout=30)  # a connection of its own
        assert str(response.status_code) == status, response.text
        return route, status

    before = request_counts(stack.api_url)  # start_api's own /healthz probe
    sent: Counter[tuple[str, str]] = Counter({key: int(n) for key, n in before.items() if key[0] != "/metrics"})
    with ThreadPoolExecutor(8) as pool:
        # Until both workers have served some (each one's observations are in files named by its pid).
        while True:
            sent.update(pool.map(send, range(40)))
            if all(routes_served(pid) - {"/metrics", None} for pid in workers):
                break
            assert time.monotonic() < deadline, f"not every worker served a request: {sent}"
    for _ in range(4):  # whichever worker answers the scrape
        counts = request_counts(stack.api_url)
        assert {key: counts.get(key) for key in sent} == {key: float(n) for key, n in sent.items()}
    (folder,) = {path.parent for pid in workers for path in metrics_files(pid)}
    api.stop()
    assert not folder.exists()  # the private folder goes with gunicorn
