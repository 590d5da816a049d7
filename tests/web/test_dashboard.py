"""The web dashboard in a real browser (headless chromium, driven by selenium) against a real stack: sign in with a
key (Enter submits), the jobs list with its filters in the address, a finished training job's page with a loss
chart of as many points as the job has metrics, a failed job's error, a generate job's results, a job followed live
until it ends, the files and models pages, reloads and bookmarks that keep the session, and signing out; then seeds
beyond 2**53 shown with every digit, the learning-rate axis's labels, long names that must not widen the pages, and
unknown filter values in the address.

`UPDATE_SCREENSHOT=1` also saves the finished training job's page as docs/dashboard-job.png (the README shows it);
without it the test writes nothing into the tree.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.api.test_models import checkpoint, tar_bytes
from tests.conftest import REPO_ROOT
from tests.e2e.conftest import Api, Stack, corpus_file
from tests.e2e.test_jobs_run import every, finished, wait_for

from .conftest import Browser

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}
WAIT = 60  # seconds: generous, the machine may be busy
JOB_TIMEOUT = 300
SCREENSHOT = REPO_ROOT / "docs" / "dashboard-job.png"


# Integers a JavaScript Number cannot hold (beyond 2**53): JSON.parse alone would show 5,491,092,537,469,876,000.
BIG_SEED = 5491092537469876022
BIG_SAMPLING_SEED = 61145889012496262
LONG_SUFFIX = "a-suffix-as-long-as-suffixes-may-be-40ch"  # 40 characters, the most a suffix may have
LONG_FILENAME = ("a-training-file-whose-name-has-no-spaces-to-wrap-at_" * 5)[:236] + ".txt"  # 240 characters
LONG_MODEL_NAME = ("a-model-name-without-any-space-in-it-" * 7)[:255]


def train_body(file_id: str, steps: int) -> dict[str, Any]:
    return {"type": "train", "training_file": file_id, "model": TINY_MODEL, "seed": 7, "suffix": "web",
            "hyperparameters": {"max_steps": steps, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 10,
                                "checkpoint_every": 10, "sample_every": 15}}


def submit(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def loss_points(api: Api, job_id: str) -> int:
    """Rows of GET /v1/jobs/{id}/metrics with a training loss: what the chart must plot."""
    rows, after = [], None
    while True:
        page = api.get(f"/v1/jobs/{job_id}/metrics", params={} if after is None else {"after": after})
        assert page.status_code == 200, page.text
        body = page.json()
        rows += body["data"]
        if not body["has_more"] or not body["data"]:
            break
        after = body["data"][-1]["step"]
    return sum(row["train_loss"] is not None for row in rows)


@pytest.fixture(scope="module")
def jobs(stack: Stack, api: Api, tmp_path_factory) -> dict[str, Any]:
    """A finished training job, a generate job on its model, and a generate job that failed (its model's files
    were removed from the server's disk)."""
    folder = tmp_path_factory.mktemp("web-data")
    path = corpus_file(folder)
    with path.open("rb") as text:
        uploaded = api.post("/v1/files", files={"file": (path.name, text)}, data={"purpose": "train"})
    assert uploaded.status_code == 201, uploaded.text
    file_id = uploaded.json()["id"]

    train, _ = finished(api, submit(api, train_body(file_id, 30))["id"], JOB_TIMEOUT)
    model_id = train["result"]["model"]
    generate, _ = finished(api, submit(api, {"type": "generate", "model": model_id, "prompts": ["Hello", "The cat"],
                                             "sampling": {"max_new_tokens": 8, "seed": 1}})["id"], JOB_TIMEOUT)

    imported = api.post("/v1/models", files={"file": ("doomed.tar.gz", tar_bytes(checkpoint()))})
    assert imported.status_code == 201, imported.text
    doomed = imported.json()["id"]
    for config in Path(stack.environment["GPT2JOBS_VAR_DIR"]).rglob("config.json"):
        if doomed in str(config):
            config.unlink()
    failed, _ = wait_for(api, submit(api, {"type": "generate", "model": doomed, "prompts": ["A"],
                                           "sampling": {"max_new_tokens": 4}})["id"],
                         lambda j: j["status"] in ("succeeded", "failed", "cancelled"), JOB_TIMEOUT)
    assert failed["status"] == "failed" and failed["error"]["message"], failed
    return {"file": file_id, "train": train, "model": model_id, "generate": generate, "failed": failed}


# --- browser helpers -----------------------------------------------------------------------------------------------


def wait(browser: Browser, condition: Callable[[Any], Any], message: str, timeout: float = WAIT) -> Any:
    try:
        return WebDriverWait(browser.driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except Exception as exc:
        logs = browser_log(browser)
        raise AssertionError(f"{message} (at {browser.driver.current_url})\nbrowser console:\n{logs}") from exc


def browser_log(browser: Browser) -> str:
    try:
        return "\n".join(entry["message"] for entry in browser.driver.get_log("browser"))
    except Exception:  # not every driver keeps a console log
        return "(no console log)"


def by_testid(testid: str) -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{testid}"]'


def find(browser: Browser, testid: str) -> WebElement:
    return wait(browser, lambda d: d.find_element(*by_testid(testid)), f"no element data-testid={testid}")


def visible_text(browser: Browser, testid: str, needle: str) -> WebElement:
    def shows(driver):
        element = driver.find_element(*by_testid(testid))
        return element if needle in element.text else False

    return wait(browser, shows, f"data-testid={testid} never showed {needle!r}")


def sign_in(browser: Browser, key: str, path: str = "/") -> None:
    browser.driver.get(browser.base_url + path)
    field = find(browser, "api-key")
    field.clear()
    field.send_keys(key, Keys.ENTER)
    wait(browser, lambda d: not d.find_elements(*by_testid("api-key")), "still on the sign-in form")


def signed_in(browser: Browser, api: Api, path: str) -> None:
    """Open `path`, signing in first if this tab has no key."""
    browser.driver.get(browser.base_url + path)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "main h1"), "the page never rendered")
    if browser.driver.find_elements(*by_testid("api-key")):
        sign_in(browser, api.key, path)  # type: ignore[attr-defined]


def chart_points(browser: Browser, expected: int) -> WebElement:
    def plotted(driver):
        chart = driver.find_element(*by_testid("loss-chart"))
        return chart if chart.get_attribute("data-points") == str(expected) else False

    return wait(browser, plotted, f"the loss chart never had {expected} points")


def job_row_ids(browser: Browser) -> list[str]:
    rows = browser.driver.find_elements(By.CSS_SELECTOR, '[data-testid="jobs-table"] tbody tr[data-job-id]')
    return [row.get_attribute("data-job-id") for row in rows]


# --- tests ---------------------------------------------------------------------------------------------------------


def test_sign_in_then_open_a_finished_training_job_from_the_list(browser: Browser, api: Api, jobs: dict[str, Any]):
    driver = browser.driver
    driver.get(browser.base_url + "/")
    field = find(browser, "api-key")
    field.send_keys("sk-not-a-key", Keys.ENTER)
    visible_text(browser, "sign-in-error", "not valid")  # the API's own message for a 401
    assert driver.find_elements(*by_testid("api-key"))

    field = find(browser, "api-key")
    field.clear()
    field.send_keys(api.key, Keys.ENTER)  # type: ignore[attr-defined]
    train, generate, failed = jobs["train"], jobs["generate"], jobs["failed"]
    wait(browser, lambda d: set(job_row_ids(browser)) >= {train["id"], generate["id"], failed["id"]},
         "the jobs list never showed the three jobs")
    assert driver.current_url == browser.base_url + "/jobs"
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{train["id"]}"]')
    assert "train" in row.text and "succeeded" in row.text and "step 30/30" in row.text
    assert "failed" in driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{failed["id"]}"]').text

    row.find_element(By.CSS_SELECTOR, "a").click()
    wait(browser, lambda d: d.current_url == f"{browser.base_url}/jobs/{train['id']}", "the link did not open the job")
    expected = loss_points(api, train["id"])
    assert expected > 0
    chart_points(browser, expected)
    visible_text(browser, "job-summary", "succeeded")
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="job-checkpoints"] tbody tr'),
             "no checkpoints shown")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))


def test_a_bookmarked_job_page_shows_chart_parameters_checkpoints_events_and_samples(
        browser: Browser, api: Api, jobs: dict[str, Any]):
    train = jobs["train"]
    signed_in(browser, api, f"/jobs/{train['id']}")
    chart_points(browser, loss_points(api, train["id"]))
    parameters = find(browser, "job-parameters")
    wait(browser, lambda d: "hyperparameters.max_steps" in parameters.text, "no parameters")
    assert "hyperparameters.eval_every" in parameters.text and "n_layer 1" in parameters.text
    checkpoints = [c["step"] for c in api.get(f"/v1/jobs/{train['id']}/checkpoints").json()["data"]]
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="job-checkpoints"] tbody tr'))
         == len(checkpoints), f"the checkpoints table never had {len(checkpoints)} rows")
    events = [e for e in every(api, f"/v1/jobs/{train['id']}/events") if e["type"] == "message"]
    visible_text(browser, "job-events", events[-1]["message"])
    visible_text(browser, "job-result", train["result"]["model"])
    samples = [e for e in events if (e["data"] or {}).get("samples")]
    assert samples, "sample_every produced no samples"
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="job-samples"] .sample-group'))
         == len(samples), "not every samples event is shown")

    # A reload keeps the session (sessionStorage) and the page.
    browser.driver.refresh()
    chart_points(browser, loss_points(api, train["id"]))
    assert not browser.driver.find_elements(*by_testid("api-key"))


def test_a_failed_job_shows_its_error(browser: Browser, api: Api, jobs: dict[str, Any]):
    failed = jobs["failed"]
    signed_in(browser, api, f"/jobs/{failed['id']}")
    box = visible_text(browser, "job-error", failed["error"]["message"])
    assert failed["error"]["code"] in box.text
    assert find(browser, "job-summary").text.count("failed") >= 1
    # A finished job gets no more results: the page says why there are none rather than "No results yet."
    assert api.get(f"/v1/jobs/{failed['id']}/results").json()["data"] == []
    none = visible_text(browser, "no-results", "No results: the job failed before any prompt finished.")
    assert "yet" not in none.text


def test_a_generate_job_shows_progress_and_results(browser: Browser, api: Api, jobs: dict[str, Any]):
    generate = jobs["generate"]
    signed_in(browser, api, f"/jobs/{generate['id']}")
    visible_text(browser, "job-progress", "2/2 prompts")
    results = api.get(f"/v1/jobs/{generate['id']}/results").json()["data"]
    table = visible_text(browser, "job-results", "The cat")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 2
    assert results[0]["completions"][0]["text"].strip()[:5] in rows[0].text
    assert not browser.driver.find_elements(*by_testid("loss-chart"))


def test_filters_are_kept_in_the_address(browser: Browser, api: Api, jobs: dict[str, Any]):
    signed_in(browser, api, "/jobs?type=generate")
    want = {jobs["generate"]["id"], jobs["failed"]["id"]}
    wait(browser, lambda d: set(job_row_ids(browser)) == want, "type=generate did not filter the list")
    Select(find(browser, "filter-status")).select_by_value("failed")
    wait(browser, lambda d: "status=failed" in d.current_url and job_row_ids(browser) == [jobs["failed"]["id"]],
         "the status filter did not apply or did not reach the address")
    assert "type=generate" in browser.driver.current_url
    browser.driver.back()
    wait(browser, lambda d: set(job_row_ids(browser)) == want, "back did not restore the previous filter")


def test_files_and_models_pages(browser: Browser, api: Api, jobs: dict[str, Any]):
    signed_in(browser, api, "/files")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-file-id="{jobs["file"]}"]'),
         "the uploaded file is not listed")
    browser.driver.find_element(By.CSS_SELECTOR, 'nav a[data-nav="models"]').click()
    row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-model-id="{jobs["model"]}"]'),
               "the trained model is not listed")
    assert browser.driver.current_url == browser.base_url + "/models"
    assert "job" in row.text and jobs["train"]["id"] in row.text


def test_a_running_job_is_followed_live_until_it_ends(browser: Browser, api: Api, jobs: dict[str, Any]):
    """Opened as soon as it is submitted, the page follows the job (through the event stream when the server has
    one) and ends with every metrics row plotted, without a reload."""
    job = submit(api, train_body(jobs["file"], 120))
    signed_in(browser, api, f"/jobs/{job['id']}")
    finished(api, job["id"], JOB_TIMEOUT)
    visible_text(browser, "job-summary", "succeeded")
    chart_points(browser, loss_points(api, job["id"]))
    streams = api.get(f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}, stream=True)
    serves_streams = streams.headers.get("Content-Type", "").startswith("text/event-stream")
    streams.close()
    mode = find(browser, "live-mode").get_attribute("data-mode")
    if mode is not None:  # None: the job had ended before the page first read it
        assert mode == ("stream" if serves_streams else "polling")


def test_sign_out_forgets_the_key(browser: Browser, api: Api, jobs: dict[str, Any]):
    signed_in(browser, api, "/jobs")
    find(browser, "sign-out").click()
    find(browser, "api-key")
    assert browser.driver.execute_script("return window.sessionStorage.length") == 0
    browser.driver.get(browser.base_url + f"/jobs/{jobs['train']['id']}")
    find(browser, "api-key")  # a bookmark asks for the key again


# --- fixes: big integers, axis labels, long names, unknown filters --------------------------------------------------
# These run last: they add jobs, files and models that the tests above do not expect.


def fits_the_window(browser: Browser) -> None:
    """The page does not scroll sideways: nothing is wider than the window."""
    scroll, inner = browser.driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll <= inner, f"{browser.driver.current_url} is {scroll} px wide in a {inner} px window"


def in_page(browser: Browser, script: str, *args: Any) -> Any:
    """Run `script` (the body of an async function of `args`) in the page; its result, or the error it threw."""
    result = browser.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async (args) => {{ {script} }})(Array.from(arguments).slice(0, -1))"
        ".then((value) => done({value}), (error) => done({error: String(error)}));", *args)
    assert "error" not in result, result["error"]
    return result["value"]


def test_seeds_beyond_2_53_keep_every_digit_and_the_learning_rate_axis_reads_true(
        browser: Browser, api: Api, jobs: dict[str, Any]):
    body = train_body(jobs["file"], 20)
    body.update(seed=BIG_SEED, suffix=LONG_SUFFIX)
    body["hyperparameters"].update(learning_rate=6e-4, warmup_steps=5)
    job = submit(api, body)
    assert job["seed"] == BIG_SEED  # Python reads JSON integers exactly
    generate = submit(api, {"type": "generate", "model": jobs["model"], "prompts": ["Hello"],
                            "sampling": {"max_new_tokens": 4, "seed": BIG_SAMPLING_SEED}})
    assert generate["sampling"]["seed"] == BIG_SAMPLING_SEED

    # Followed live (the event stream's `data:` payloads), then read again from the JSON routes after a reload.
    signed_in(browser, api, f"/jobs/{job['id']}")
    finished(api, job["id"], JOB_TIMEOUT)
    visible_text(browser, "job-summary", "succeeded")
    for when in ("followed live", "reloaded"):
        if when == "reloaded":
            browser.driver.refresh()
        parameters = visible_text(browser, "job-parameters", f"seed {BIG_SEED}")
        assert "5491092537469876000" not in parameters.text and "5,491" not in parameters.text, when
        if when == "followed live":
            mode = find(browser, "live-mode").get_attribute("data-mode")
            assert mode in (None, "stream")  # None: the job had ended before the page first read it

    # The stream itself, read by the page's own reader: the final job's seed arrives as an exact BigInt.
    streamed = in_page(browser, """
        const { readJobStream } = await import("/static/dashboard/js/sse.js");
        let end = null;
        const outcome = await readJobStream(args[0], { signal: new AbortController().signal,
                                                       handlers: { onEnd: (j) => { end = j; } } });
        return { outcome: outcome.outcome, type: typeof end?.seed, seed: String(end?.seed) };""", job["id"])
    assert streamed == {"outcome": "end", "type": "bigint", "seed": str(BIG_SEED)}

    # The learning-rate axis (peak 6e-4): distinct labels that read back as evenly spaced ticks, written 2e-4 and
    # the like, not uPlot's default 0, 0, 0.001.
    chart = chart_points(browser, loss_points(api, job["id"]))
    labels = json.loads(wait(browser, lambda d: chart.get_attribute("data-lr-ticks"), "no learning-rate ticks"))
    values = [float(label) for label in labels]
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
    gaps = [b - a for a, b in zip(values, values[1:])]
    assert all(gap > 0 and abs(gap - gaps[0]) <= 1e-9 * abs(gaps[0]) + 1e-15 for gap in gaps), labels
    assert max(values) <= 1e-3 and all(re.fullmatch(r"0|\d(\.\d+)?e-\d+", label) for label in labels), labels
    formatted = in_page(browser, """
        const { formatTicks } = await import("/static/dashboard/js/chart.js");
        return [formatTicks([0, 2e-4, 4e-4, 6.000000000000001e-4]), formatTicks([0, 2.5e-4, 5e-4, 7.5e-4]),
                formatTicks([2.5, 3, 3.5])];""")
    assert formatted == [["0", "2e-4", "4e-4", "6e-4"], ["0", "2.5e-4", "5e-4", "7.5e-4"], ["2.5", "3", "3.5"]]

    finished(api, generate["id"], JOB_TIMEOUT)
    signed_in(browser, api, f"/jobs/{generate['id']}")
    parameters = visible_text(browser, "job-parameters", str(BIG_SAMPLING_SEED))
    assert "61145889012496264" not in parameters.text and "61,145" not in parameters.text


def test_long_names_wrap_or_are_cut_and_no_page_scrolls_sideways(
        browser: Browser, api: Api, jobs: dict[str, Any], tmp_path: Path):
    assert len(LONG_FILENAME) == 240 and len(LONG_MODEL_NAME) == 255 and len(LONG_SUFFIX) == 40
    with corpus_file(tmp_path, 2000).open("rb") as text:
        uploaded = api.post("/v1/files", files={"file": (LONG_FILENAME, text)}, data={"purpose": "train"})
    assert uploaded.status_code == 201, uploaded.text
    imported = api.post("/v1/models", files={"file": ("long.tar.gz", tar_bytes(checkpoint()))},
                        data={"name": LONG_MODEL_NAME})
    assert imported.status_code == 201, imported.text

    signed_in(browser, api, "/files")
    row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-file-id="{uploaded.json()["id"]}"]'),
               "the file with a long name is not listed")
    name = row.find_element(By.CSS_SELECTOR, ".long-text")
    assert name.get_attribute("title") == LONG_FILENAME  # the whole name on hover
    assert name.text and LONG_FILENAME.startswith(name.text.replace("\n", "")[:40])
    fits_the_window(browser)

    signed_in(browser, api, "/models")
    row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-model-id="{imported.json()["id"]}"]'),
               "the model with a long name is not listed")
    assert row.find_element(By.CSS_SELECTOR, ".long-text").get_attribute("title") == LONG_MODEL_NAME
    titles = [e.get_attribute("title") for e in browser.driver.find_elements(By.CSS_SELECTOR, "td .long-text")]
    assert any(title.endswith(f":{LONG_SUFFIX}") for title in titles), titles  # a trained model, long suffix
    fits_the_window(browser)

    for path in ("/jobs", f"/jobs/{jobs['train']['id']}"):
        signed_in(browser, api, path)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "table tbody tr"), f"{path} shows no table")
        fits_the_window(browser)


def test_unknown_filter_values_are_named_not_silently_dropped(browser: Browser, api: Api, jobs: dict[str, Any]):
    driver = browser.driver
    signed_in(browser, api, "/jobs?status=bogus&type=%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    note = visible_text(browser, "filter-notice", "Unknown status “bogus”: showing jobs of any status.")
    assert "Unknown type “<script>alert(1)</script>”: showing jobs of any type." in note.text  # as text, not HTML
    assert not driver.find_elements(By.CSS_SELECTOR, "main script")
    wait(browser, lambda d: set(job_row_ids(browser)) >= {jobs["train"]["id"], jobs["failed"]["id"]},
         "the jobs list is not shown under the notice")
    assert Select(find(browser, "filter-status")).first_selected_option.get_attribute("value") == ""

    # Choosing a filter keeps only known values in the address; the notice goes.
    Select(find(browser, "filter-status")).select_by_value("failed")
    wait(browser, lambda d: d.current_url == f"{browser.base_url}/jobs?status=failed", "the address kept bad values")
    wait(browser, lambda d: jobs["failed"]["id"] in job_row_ids(browser), "the failed job is not listed")
    assert not driver.find_elements(*by_testid("filter-notice"))


# --- pause, resume, and checkpoints registered as models --------------------------------------------------------------


def long_train_body(file_id: str, steps: int) -> dict[str, Any]:
    return {"type": "train", "training_file": file_id, "model": TINY_MODEL,
            "hyperparameters": {"max_steps": steps, "batch_size": 1, "eval_every": 0}}


def badge(browser: Browser, status: str) -> WebElement:
    selector = f'[data-testid="job-summary"] .badge[data-status="{status}"]'
    return wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, selector), f"the job page never showed {status}")


def buttons_shown(browser: Browser, *testids: str) -> None:
    """Exactly these of the job's action buttons are shown."""
    actions = ("pause-job", "resume-job", "cancel-job")
    wait(browser, lambda d: [t for t in actions if d.find_element(*by_testid(t)).is_displayed()] == list(testids),
         f"the job page's buttons are not {testids}")


def cancel_quietly(api: Api, job_id: str) -> None:
    api.post(f"/v1/jobs/{job_id}/cancel")  # a 409 (already finished) is fine


def test_pause_and_resume_a_queued_job_then_pause_a_running_one(browser: Browser, api: Api, jobs: dict[str, Any]):
    # The stack's one worker (concurrency 1) trains `busy`, so `queued` stays queued.
    busy = submit(api, long_train_body(jobs["file"], 100_000))
    queued = None
    try:
        wait_for(api, busy["id"], lambda j: j["status"] == "running", JOB_TIMEOUT)
        queued = submit(api, long_train_body(jobs["file"], 5))
        signed_in(browser, api, f"/jobs/{queued['id']}")
        badge(browser, "queued")
        buttons_shown(browser, "pause-job", "cancel-job")

        find(browser, "pause-job").click()
        badge(browser, "paused")
        buttons_shown(browser, "resume-job", "cancel-job")
        assert api.get(f"/v1/jobs/{queued['id']}").json()["status"] == "paused"
        visible_text(browser, "job-events", "Job paused before a worker took it")

        find(browser, "resume-job").click()
        badge(browser, "queued")
        buttons_shown(browser, "pause-job", "cancel-job")
        assert api.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
        # Followed again after the resume: a change made elsewhere shows without a reload.
        assert api.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
        badge(browser, "cancelled")
        buttons_shown(browser)

        # A running job is pausing until its worker has written a checkpoint, then paused: followed live.
        signed_in(browser, api, f"/jobs/{busy['id']}")
        badge(browser, "running")
        buttons_shown(browser, "pause-job", "cancel-job")
        find(browser, "pause-job").click()
        badge(browser, "paused")
        buttons_shown(browser, "resume-job", "cancel-job")
        paused = api.get(f"/v1/jobs/{busy['id']}").json()
        assert paused["status"] == "paused"
        checkpoints = api.get(f"/v1/jobs/{busy['id']}/checkpoints").json()["data"]
        assert checkpoints, "no checkpoint written at the pause"
        visible_text(browser, "job-events", f"paused at step {checkpoints[-1]['step']}")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="job-checkpoints"] tbody tr'))
             == len(checkpoints), "the checkpoint written at the pause is not listed")

        signed_in(browser, api, "/jobs?status=paused")
        wait(browser, lambda d: job_row_ids(browser) == [busy["id"]], "the paused filter does not list the paused job")
        assert 'data-status="paused"' in browser.driver.find_element(
            By.CSS_SELECTOR, f'tr[data-job-id="{busy["id"]}"]').get_attribute("innerHTML")

        # A paused job can be cancelled from its page.
        signed_in(browser, api, f"/jobs/{busy['id']}")
        badge(browser, "paused")
        find(browser, "cancel-job").click()
        wait(browser, expected_conditions.alert_is_present(), "no confirmation was asked").accept()
        badge(browser, "cancelled")
        buttons_shown(browser)
    finally:
        for job in (busy, queued):
            if job is not None:
                cancel_quietly(api, job["id"])


def test_a_checkpoint_row_registers_its_checkpoint_as_a_model(browser: Browser, api: Api, jobs: dict[str, Any]):
    train = jobs["train"]
    checkpoints = api.get(f"/v1/jobs/{train['id']}/checkpoints").json()["data"]
    assert checkpoints and all(c["val_accuracy"] is not None for c in checkpoints)  # eval_every 10, checkpoint_every 10
    signed_in(browser, api, f"/jobs/{train['id']}")
    table = find(browser, "job-checkpoints")
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert headers[:7] == ["STEP", "TRAINING LOSS", "VALIDATION LOSS", "PERPLEXITY", "ACCURACY", "SIZE", "SAVED"], headers
    first = checkpoints[0]
    row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-checkpoint-id="{first["id"]}"]'),
               "the first checkpoint has no row")
    accuracy = row.find_elements(By.CSS_SELECTOR, "td")[4].text
    assert accuracy.endswith("%") and abs(float(accuracy.rstrip("%").strip()) - 100 * first["val_accuracy"]) <= 0.051
    # The result says which step the model is from and why the run stopped.
    visible_text(browser, "job-result", "max_steps (ran all its steps)")

    row.find_element(*by_testid("register-checkpoint")).click()
    registered = wait(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f'tr[data-checkpoint-id="{first["id"]}"] [data-testid="registered-model"]'),
        "the registered model is not shown in the checkpoint's row")
    model_id = registered.get_attribute("data-model-id")
    model = api.get(f"/v1/models/{model_id}").json()
    assert (model["source"], model["job_id"], model["checkpoint_step"]) == ("checkpoint", train["id"], first["step"])
    assert model_id in registered.text and model["name"] in registered.text
    # Registering it again (another click after a reload) gives the same model.
    assert api.post(f"/v1/jobs/{train['id']}/checkpoints/{first['id']}/model").json()["id"] == model_id

    registered.find_element(By.CSS_SELECTOR, "a").click()
    listed = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-model-id="{model_id}"]'),
                  "the models page does not list the registered model")
    assert browser.driver.current_url == browser.base_url + "/models"
    assert train["id"] in listed.text and f"step {first['step']}" in listed.text


def test_auto_hyperparameters_and_a_training_result_read_in_words(browser: Browser, api: Api, jobs: dict[str, Any]):
    """The job page's pieces on a job that resolved "auto" values and stopped early (made up: such a run takes
    long on a CPU): the chosen values marked (auto), the model's step and the reason it stopped, and checkpoints
    of steps without an evaluation."""
    signed_in(browser, api, "/jobs")
    shown = in_page(browser, """
        const { checkpointsTable, parametersTable, resultBox } = await import("/static/dashboard/js/views/job-parts.js");
        const job = { id: "job-x", type: "train", status: "succeeded", model: "gpt2", seed: 1,
          hyperparameters: { max_steps: null, n_epochs: 2.5, batch_size: 16, learning_rate: 0.0003,
                             auto: ["n_epochs", "batch_size"], select_model: "best" },
          result: { model: "model-x", model_step: 120, stop_reason: "early_stopping", best_step: 120 } };
        const cells = (el) => Object.fromEntries([...el.querySelectorAll("tr")].map((tr) =>
          [tr.cells[0].textContent, tr.cells[1].textContent]));
        const checkpoints = checkpointsTable([{ id: "ckpt-a", step: 7, train_loss: 5.5, val_loss: null,
          val_perplexity: null, val_accuracy: null, bytes: 1000, created_at: 1 }]);
        return { parameters: cells(parametersTable(job)), result: cells(resultBox(job)),
                 checkpoint: [...checkpoints.querySelectorAll("tbody td")].map((td) => td.textContent) };""")
    parameters, result = shown["parameters"], shown["result"]
    assert parameters["hyperparameters.batch_size"] == "16 (auto)" and parameters["hyperparameters.n_epochs"] == "2.5 (auto)"
    assert parameters["hyperparameters.learning_rate"] == "0.0003" and "hyperparameters.auto" not in parameters
    assert result["model_step"] == "120 (the best validation loss)"
    assert result["stop_reason"] == "early_stopping (stopped early: the validation loss had stopped improving)"
    assert shown["checkpoint"][:5] == ["7", "5.5", "—", "—", "—"]
