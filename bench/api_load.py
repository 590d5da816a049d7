"""The API under load: N job submissions from M concurrent clients against gunicorn on PostgreSQL and Redis, with
bare gunicorn serving `/healthz` (the same app, the same workers, the same client harness and number of requests)
as the reference, in one run. Prints requests/s, p50/p99 latency and status counts of both, their ratio
(submissions / healthz), and checks what the submissions left behind: duplicates, rows in the jobs table against
acknowledged submissions, and one queued message per row.

Half of the N logical submissions carry an `Idempotency-Key` (unique to the submission) and are each sent twice:
the two sends are adjacent in the clients' shared work list, so two clients send them at about the same moment
and they race each other through the API (the case in which a duplicate row could appear). N submissions are
therefore 1.5 N requests; the healthz phase sends as many. Every client is a thread with its own connection
(http.client, reconnecting whenever the server closes it),
sending its next request as soon as the previous answer is read (a closed loop: M requests are always in flight).
The two phases are interleaved (`--repeats`, default 3) and the best of each is compared.

The script sets everything up and removes it afterwards: a fresh PostgreSQL database (`alembic upgrade head`), an
empty Redis database as the broker (no Celery worker runs: the jobs just queue, and the queue is deleted at the
end), ARTIFACT_DIR in a temporary folder, an API key (`flask --app api keys create`) and a training file uploaded
through the API, then `gunicorn --workers W 'api:create_app()'` as docker-compose.yml's api service runs it. It
also reads every process's CPU time from /proc around each phase, to show where the cores went (this process is
the clients; PostgreSQL and Redis are the local servers).

    python bench/api_load.py                                  # 2,000 submissions from 40 clients, 2 workers
    python bench/api_load.py --jobs 500 --clients 10 --gunicorn-workers 4
    python bench/api_load.py --database-url postgresql://postgres@127.0.0.1:5432/mydb --broker-url redis://127.0.0.1:6379/13
    python bench/api_load.py --json                           # one JSON document on stdout instead of the report

Exits 1 when a submission got a 5xx or no answer, a key produced two jobs, or the rows do not match the
acknowledged submissions.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pydoc_data.topics
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.local import console_script, free_port  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BROKER_URL = "redis://127.0.0.1:6379/14"
QUEUE = "train"  # where train jobs go (jobs.queue.JOB_QUEUES)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- the client harness -------------------------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    key: str | None = None  # the Idempotency-Key, if any
    send: int = 1  # 1, or 2 for the repeated send of a key


@dataclass
class Answer:
    request: Request
    started: float
    ended: float
    status: int  # 0: no answer (connection error, timeout)
    job_id: str | None = None
    error: str | None = None


def hammer(host: str, port: int, requests_: list[Request], clients: int) -> tuple[float, list[Answer]]:
    """Send `requests_` from `clients` threads, each taking the next one from the shared list as soon as its previous
    answer is read. Returns the wall time from the first send to the last answer, and every answer."""
    lock = threading.Lock()
    position = 0
    answers: list[Answer] = []
    start = threading.Barrier(clients + 1)

    def client() -> None:
        nonlocal position
        connection: http.client.HTTPConnection | None = None
        mine: list[Answer] = []
        start.wait()
        while True:
            with lock:
                if position >= len(requests_):
                    break
                request = requests_[position]
                position += 1
            began = time.perf_counter()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(host, port, timeout=120)
                connection.request(request.method, request.path, body=request.body, headers=request.headers)
                response = connection.getresponse()
                data = response.read()
                answer = Answer(request, began, time.perf_counter(), response.status)
                if response.will_close:
                    connection.close()
                    connection = None
                if request.method == "POST" and 200 <= response.status < 300:
                    answer.job_id = json.loads(data)["id"]
                elif response.status >= 300:
                    answer.error = data[:300].decode(errors="replace")
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                answer = Answer(request, began, time.perf_counter(), 0, error=f"{type(exc).__name__}: {exc}")
                if connection is not None:
                    connection.close()
                connection = None
            mine.append(answer)
        if connection is not None:
            connection.close()
        with lock:
            answers.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, answers


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * fraction // 1))
    return sorted_values[int(rank) - 1]


def summary(seconds: float, answers: list[Answer]) -> dict[str, Any]:
    latencies = sorted(a.ended - a.started for a in answers)
    statuses = Counter(a.status for a in answers)
    return {
        "requests": len(answers),
        "seconds": round(seconds, 3),
        "requests_per_second": round(len(answers) / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "5xx": sum(v for k, v in statuses.items() if k >= 500),
        "other_non_2xx": sum(v for k, v in statuses.items() if not 200 <= k < 300 and k < 500),
    }


# --- CPU time by process, from /proc --------------------------------------------------------------------------------

def machine_busy_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def cpu_by_role(gunicorn_pid: int, database: str) -> dict[str, float]:
    """CPU seconds used so far by: this process (the clients), gunicorn (master and workers), PostgreSQL backends
    serving `database`, PostgreSQL's own processes (WAL writer, checkpointer...), Redis, and everything else."""
    roles: dict[str, float] = defaultdict(float)
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                raw = stat.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                title = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        comm_end = raw.rindex(")")
        comm, rest = raw[raw.index("(") + 1:comm_end], raw[comm_end + 2:].split()
        pid, ppid, ticks = int(entry.name), int(rest[1]), int(rest[11]) + int(rest[12])
        if pid == me:
            role = "clients (this process)"
        elif gunicorn_pid in (pid, ppid):
            role = "gunicorn"
        elif comm == "postgres" or title.startswith("postgres:"):
            if f" {database} " in title:
                role = "postgresql (this database)"
            elif "/main: " in title and ("(" not in title or "autovacuum" in title):
                role = "postgresql (server)"
            else:
                role = "other"
        elif comm == "redis-server":
            role = "redis"
        else:
            role = "other"
        roles[role] += ticks / CLK_TCK
    return roles


class CpuMeter:
    def __init__(self, gunicorn_pid: int, database: str):
        self.gunicorn_pid, self.database = gunicorn_pid, database

    def __enter__(self) -> "CpuMeter":
        self.wall, self.busy = time.perf_counter(), machine_busy_seconds()
        self.roles = cpu_by_role(self.gunicorn_pid, self.database)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        wall = time.perf_counter() - self.wall
        busy = machine_busy_seconds() - self.busy
        after = cpu_by_role(self.gunicorn_pid, self.database)
        used = {role: max(0.0, after[role] - self.roles.get(role, 0.0)) for role in after if role != "other"}
        used["other"] = max(0.0, busy - sum(used.values()))
        # Cores each role kept busy on average over the phase; "idle" is what was left of the machine.
        self.cores = {role: round(seconds / wall, 2) for role, seconds in sorted(used.items())}
        self.cores["idle"] = round(max(0.0, (os.cpu_count() or 1) - busy / wall), 2)


# --- setting up and taking down -------------------------------------------------------------------------------------

def psycopg_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgresql") else url


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


class Setup:
    """A database, a Redis database, an artifact folder and gunicorn; everything undone by close()."""

    def __init__(self, args: argparse.Namespace, scratch: Path):
        self.args, self.scratch = args, scratch
        self.tag = secrets.token_hex(4)
        self.created_database: str | None = None
        self.gunicorn: subprocess.Popen | None = None
        self.redis: redis.Redis | None = None
        self.redis_keys_before: set[bytes] = set()
        self.redis = redis.Redis.from_url(args.broker_url)
        self.redis_keys_before = set(self.redis.keys("*"))
        if self.redis_keys_before:
            raise SystemExit(f"{args.broker_url} holds {len(self.redis_keys_before)} keys; the benchmark needs an "
                             "empty Redis database of its own (pass another number with --broker-url)")
        if args.database_url:
            self.database_url = args.database_url
        else:
            self.created_database = f"gpt2jobs_bench_{self.tag}"
            with psycopg.connect(psycopg_url(args.admin_url), autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{self.created_database}"')
            self.database_url = with_database(args.admin_url, self.created_database)
        self.database = urlsplit(self.database_url).path.lstrip("/")
        self.port = free_port()
        self.env = {**os.environ, "DATABASE_URL": self.database_url, "BROKER_URL": args.broker_url,
                    "GPT2JOBS_VAR_DIR": str(scratch / "var"), "ARTIFACT_DIR": str(scratch / "var" / "artifacts"),
                    "PYTHONUNBUFFERED": "1"}

    def run(self, *argv: str) -> str:
        done = subprocess.run([console_script(argv[0]), *argv[1:]], cwd=ROOT, env=self.env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        self.run("alembic", "upgrade", "head")
        self.log = self.scratch / "gunicorn.log"
        with self.log.open("w") as out:
            self.gunicorn = subprocess.Popen(
                [console_script("gunicorn"), "--bind", f"127.0.0.1:{self.port}", "--workers",
                 str(self.args.gunicorn_workers), "api:create_app()"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(300):
            try:
                if requests.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.gunicorn.poll() is not None:
                break
            time.sleep(0.2)
        raise SystemExit(f"gunicorn did not become ready:\n{self.log.read_text()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def owner(self, name: str) -> tuple[str, str, str]:
        """A new owner: (owner, API key, id of a training file uploaded through the API)."""
        owner = f"bench-{name}-{self.tag}"
        key = self.run("flask", "--app", "api", "keys", "create", "--owner", owner).strip().splitlines()[-1]
        text = "\n\n".join(list(pydoc_data.topics.topics.values())[:40])
        response = requests.post(f"{self.url}/v1/files", headers={"Authorization": f"Bearer {key}"},
                                 files={"file": ("corpus.txt", text.encode())}, data={"purpose": "train"}, timeout=60)
        if response.status_code != 201:
            raise SystemExit(f"upload: {response.status_code} {response.text}")
        return owner, key, response.json()["id"]

    def queued_messages(self) -> Counter:
        """Job id -> messages waiting for it in the queue (kombu keeps a queue as Redis lists named after it)."""
        assert self.redis is not None
        counts: Counter = Counter()
        for name in self.redis.keys(f"{QUEUE}*"):
            if self.redis.type(name) != b"list":
                continue
            for raw in self.redis.lrange(name, 0, -1):
                message = json.loads(raw)
                body = message["body"]
                if message.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                counts[json.loads(body)[0][0]] += 1
        return counts

    def index_reads(self) -> dict[str, list[int]]:
        """Index -> [scans, index entries read] on the jobs table, from PostgreSQL's statistics (complete once the
        API's connections are closed: a backend reports its counts when idle or on exit)."""
        with psycopg.connect(psycopg_url(self.database_url)) as db:
            return {name: [scans, read] for name, scans, read in db.execute(
                "SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE relname = 'jobs' "
                "AND idx_scan > 0 ORDER BY idx_tup_read DESC")}

    def stop(self) -> None:
        if self.gunicorn is not None and self.gunicorn.poll() is None:
            self.gunicorn.send_signal(signal.SIGTERM)
            try:
                self.gunicorn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.gunicorn is not None:
            try:
                os.killpg(self.gunicorn.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.stop()
        if self.redis is not None:
            new = set(self.redis.keys("*")) - self.redis_keys_before
            if new:
                self.redis.delete(*new)
            self.redis.close()
        if self.created_database:
            with psycopg.connect(psycopg_url(self.args.admin_url), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.created_database}" WITH (FORCE)')


# --- the benchmark --------------------------------------------------------------------------------------------------

def submissions(count: int, key: str, file_id: str, tag: str) -> list[Request]:
    """`count` logical submissions; every other one carries an Idempotency-Key and is sent twice in a row."""
    body = json.dumps({"type": "train", "training_file": file_id,
                       "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
                       "hyperparameters": {"max_steps": 10, "batch_size": 4}}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    out: list[Request] = []
    for i in range(count):
        if i % 2:
            out.append(Request("POST", "/v1/jobs", body, headers))
        else:
            idem = f"bench-{tag}-{i}"
            out += [Request("POST", "/v1/jobs", body, {**headers, "Idempotency-Key": idem}, idem, send)
                    for send in (1, 2)]
    return out


def check(setup: Setup, owner: str, answers: list[Answer], warmup_ids: set[str]) -> dict[str, Any]:
    """Duplicates, rows against acknowledged submissions, and queued messages against rows."""
    acknowledged = {a.job_id for a in answers if a.job_id}
    by_key: dict[str, set[str]] = defaultdict(set)
    first: dict[str, Answer] = {}
    pairs_overlapping = repeats_same_job = 0
    for answer in answers:
        if answer.request.key and answer.job_id:
            by_key[answer.request.key].add(answer.job_id)
    for answer in sorted((a for a in answers if a.request.key), key=lambda a: a.request.send):
        if answer.request.send == 1:
            first[answer.request.key] = answer
        else:
            original = first[answer.request.key]
            pairs_overlapping += answer.started < original.ended and original.started < answer.ended
            repeats_same_job += answer.job_id is not None and answer.job_id == original.job_id
    with psycopg.connect(psycopg_url(setup.database_url)) as db:
        rows = {r[0]: r[1] for r in db.execute("SELECT id, idempotency_key FROM jobs WHERE owner = %s", (owner,))}
        key_rows = dict(db.execute("SELECT idempotency_key, count(*) FROM jobs WHERE owner = %s AND idempotency_key "
                                   "IS NOT NULL GROUP BY idempotency_key", (owner,)).fetchall())
    queued = setup.queued_messages()
    keyed = len(first)
    return {
        "acknowledged_job_ids": len(acknowledged),
        "rows": len(rows),
        "rows_not_acknowledged": len(set(rows) - acknowledged),
        "acknowledged_without_row": len(acknowledged - set(rows)),
        "keyed_submissions": keyed,
        "repeats_answered_with_the_original_job": repeats_same_job,
        "pairs_in_flight_together": pairs_overlapping,
        "duplicates": sum(len(ids) > 1 for ids in by_key.values()) + sum(n > 1 for n in key_rows.values()),
        "queued_messages": sum(n for job, n in queued.items() if job not in warmup_ids),
        "rows_queued_exactly_once": sum(queued.get(job) == 1 for job in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="logical submissions (half of them sent twice)")
    parser.add_argument("--clients", type=int, default=40, help="concurrent clients (threads)")
    parser.add_argument("--gunicorn-workers", type=int, default=2)
    parser.add_argument("--database-url", help="use this (existing) database instead of creating and dropping one")
    parser.add_argument("--admin-url", default=ADMIN_URL, help="where to create the fresh database (default %(default)s)")
    parser.add_argument("--broker-url", default=BROKER_URL, help="an empty Redis database (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved; the best is compared")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    args = parser.parse_args()
    say = log if args.json else print

    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
               f"{server_versions(args)}")
    with tempfile.TemporaryDirectory(prefix="api-load-") as scratch:
        setup = Setup(args, Path(scratch))
        try:
            setup.start()
            assert setup.gunicorn is not None
            host, port = "127.0.0.1", setup.port
            say(f"{machine}; gunicorn {args.gunicorn_workers} sync workers on {setup.url}; {args.clients} clients")
            _, warm_key, warm_file = setup.owner("warmup")
            owner, key, file_id = setup.owner("load")
            per_run = len(submissions(args.jobs, key, file_id, ""))

            # Warm-up: every worker connects to the database and the broker before the clock starts.
            warm = args.gunicorn_workers * 10
            hammer(host, port, [Request("GET", "/healthz")] * warm, args.clients)
            _, warm_answers = hammer(host, port, submissions(warm, warm_key, warm_file, f"warm-{setup.tag}"),
                                     args.clients)
            warmup_ids = {a.job_id for a in warm_answers if a.job_id}

            runs: list[dict[str, Any]] = []
            submitted: list[Answer] = []
            for repeat in range(args.repeats):
                run: dict[str, Any] = {}
                for name in ("healthz", "submit"):
                    batch = (submissions(args.jobs, key, file_id, f"{setup.tag}-{repeat}") if name == "submit"
                             else [Request("GET", "/healthz")] * per_run)
                    with CpuMeter(setup.gunicorn.pid, setup.database) as meter:
                        seconds, answers = hammer(host, port, batch, args.clients)
                    run[name] = {**summary(seconds, answers), "cpu_cores": meter.cores}
                    if name == "submit":
                        submitted += answers
                        errors = Counter(a.error.splitlines()[0][:200] for a in answers if a.error)
                        run[name]["errors"] = dict(errors.most_common(5))
                    say(f"run {repeat + 1} {name:7s}: {len(batch):,} requests in {seconds:.1f} s = "
                        f"{run[name]['requests_per_second']:,.1f} requests/s")
                runs.append(run)
            setup.stop()
            time.sleep(0.5)  # the API's database sessions end and report their statistics
            checks = check(setup, owner, submitted, warmup_ids)
            checks["jobs_index_reads"] = setup.index_reads() if setup.created_database else {}
        finally:
            setup.close()

    best = {name: max((run[name] for run in runs), key=lambda r: r["requests_per_second"])
            for name in ("healthz", "submit")}
    ratio = best["submit"]["requests_per_second"] / best["healthz"]["requests_per_second"]
    report = {"machine": machine, "code": code_version(), "jobs": args.jobs, "clients": args.clients,
              "gunicorn_workers": args.gunicorn_workers,
              "repeats": args.repeats, "runs": runs, "best": best, "ratio_submit_to_healthz": round(ratio, 4),
              "checks": checks}
    failed = [reason for reason, bad in (
        ("5xx answers", sum(run["submit"]["5xx"] for run in runs)),
        ("requests without an answer", sum(run["submit"]["statuses"].get("0", 0) for run in runs)),
        ("duplicates", checks["duplicates"]),
        ("rows != acknowledged", checks["rows"] != checks["acknowledged_job_ids"]
         or checks["rows_not_acknowledged"] or checks["acknowledged_without_row"]),
    ) if bad]
    report["failed"] = failed
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    sys.exit(1 if failed else 0)


def print_report(report: dict[str, Any]) -> None:
    print(f"\ncode {report['code']}")
    print(f"{'':34s}{'requests':>9s}{'seconds':>9s}{'req/s':>9s}{'p50 ms':>9s}{'p99 ms':>9s}{'max ms':>9s}"
          f"{'5xx':>6s}{'other':>7s}")
    labels = {"healthz": "GET /healthz (reference)", "submit": "POST /v1/jobs"}
    rows = [(f"run {i + 1} {labels[name]}", run[name]) for i, run in enumerate(report["runs"]) for name in labels]
    rows += [(f"best {labels[name]}", report["best"][name]) for name in labels]
    for label, r in rows:
        print(f"{label:34s}{r['requests']:9,d}{r['seconds']:9.1f}{r['requests_per_second']:9,.1f}{r['p50_ms']:9.1f}"
              f"{r['p99_ms']:9.1f}{r['max_ms']:9.1f}{r['5xx']:6d}{r['other_non_2xx']:7d}")
    print(f"ratio submissions / healthz (best requests/s): {report['ratio_submit_to_healthz']:.3f}")
    print("cores busy on average (clients: this process; postgresql: the backends serving this database, "
          "then the server's own processes):")
    for label, r in rows[:-2]:
        print(f"  {label:34s}" + ", ".join(f"{role.split(' (')[0] if role.startswith('clients') else role} {cores:.2f}"
                                          for role, cores in r["cpu_cores"].items()))
    answers = {name: sum((Counter(run[name]["statuses"]) for run in report["runs"]), Counter()) for name in labels}
    print("answers by status, all runs: " + "; ".join(f"{name} {dict(sorted(n.items()))}" for name, n in answers.items()))
    for i, run in enumerate(report["runs"]):
        if run["submit"]["errors"]:
            print(f"run {i + 1} errors: {run['submit']['errors']}")
    c = report["checks"]
    print(f"all runs: acknowledged job ids {c['acknowledged_job_ids']:,}, rows {c['rows']:,} (not acknowledged "
          f"{c['rows_not_acknowledged']}, acknowledged without a row {c['acknowledged_without_row']}); duplicates "
          f"{c['duplicates']}; repeated keys answered with the original job {c['repeats_answered_with_the_original_job']:,}"
          f" of {c['keyed_submissions']:,} ({c['pairs_in_flight_together']:,} pairs in flight together); queued "
          f"messages {c['queued_messages']:,}, rows queued exactly once {c['rows_queued_exactly_once']:,}")
    if c["jobs_index_reads"]:
        print("jobs table index use (all phases): " + ", ".join(
            f"{name} {scans:,} scans reading {read:,} entries" for name, (scans, read) in c["jobs_index_reads"].items()))
    busy = max(run[name]["cpu_cores"]["other"] for run in report["runs"] for name in labels)
    if busy >= 0.2:
        print(f"note: other processes kept up to {busy:.2f} cores busy during a phase; these are not idle-machine figures")
    print("FAILED: " + ", ".join(report["failed"]) if report["failed"] else "OK")


def code_version() -> str:
    """The commit the code under test is at, marked when the working tree differs from it."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def server_versions(args: argparse.Namespace) -> str:
    try:
        with psycopg.connect(psycopg_url(args.database_url or args.admin_url)) as db:
            postgres = db.execute("SHOW server_version").fetchone()[0].split()[0]
        with redis.Redis.from_url(args.broker_url) as client:
            redis_version = client.info("server")["redis_version"]
        return f"PostgreSQL {postgres}, Redis {redis_version}"
    except Exception as exc:  # only for the report's header
        return f"(server versions unknown: {exc})"


if __name__ == "__main__":
    main()
