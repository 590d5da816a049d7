"""The dashboard's browser tests: a real stack (gunicorn and a celery worker on the embedded default, SQLite and the
filesystem broker) with jobs in it, and Debian's chromium driven headless through chromedriver by selenium."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Api, Stack, module_stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with module_stack(tmp_path_factory, "web") as platform:
        yield platform


@dataclass
class Browser:
    """A headless chromium and the dashboard's address."""

    driver: object  # selenium.webdriver.Chrome
    base_url: str


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Browser]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--lang=en-US", "--no-first-run", "--hide-scrollbars",
                 "--disable-background-networking", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_window_size(*WINDOW)
        # The window includes the browser's frame: grow it so that the page itself is WINDOW.
        frame = driver.execute_script("return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]")
        driver.set_window_size(WINDOW[0] + frame[0], WINDOW[1] + frame[1])
        driver.set_page_load_timeout(60)
        assert stack.api_url is not None
        yield Browser(driver, stack.api_url)
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def api(stack: Stack) -> Api:
    """The API as the owner whose jobs the browser shows; `api.key` is the key to sign in with."""
    key = stack.create_key("dashboard")
    client = Api(stack.api_url or "", key)
    client.key = key  # type: ignore[attr-defined]
    return client


