"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium, for the console's tests.

Every wait on a page has a bound. Screenshots go to the test's directory, and also to
$REMOTELLM_SCREENSHOTS when it is set (for a person to look at them).
"""

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.servers import require

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1400, 1000)
T = TypeVar("T")

# As root in a closed network: no sandbox, and none of the background connections the
# machine would refuse (updates, sync, QUIC).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def chromium(profile: Path, *, ignore_certificate_errors: bool = False) -> webdriver.Chrome:
    require(CHROMIUM if os.path.exists(CHROMIUM) else None, "chromium", "chromium")
    require(CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else None, "chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    if ignore_certificate_errors:  # the tests' own CA, which this fresh profile does not know
        options.add_argument("--ignore-certificate-errors")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: webdriver.Chrome, check: Callable[[webdriver.Chrome], T], timeout: float, what: str) -> T:
    """``check`` until it is truthy (errors count as "not yet"); fails the test after ``timeout``."""

    def attempt(d: webdriver.Chrome) -> T | bool:
        try:
            return check(d)
        except WebDriverException:
            return False

    result: T = WebDriverWait(driver, timeout, poll_frequency=0.1).until(attempt, f"waiting for {what}")
    return result


def text(driver: webdriver.Chrome, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def screenshot(driver: webdriver.Chrome, directory: Path, name: str) -> Path:
    """The page as it looks now, full height, saved as NAME.png (and copied for people to see)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WINDOW[0], max(WINDOW[1], min(int(height) + 120, 4000)))
    path = directory / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(path)), f"no screenshot of {name}"
    driver.set_window_size(*WINDOW)
    shared = os.environ.get("REMOTELLM_SCREENSHOTS")
    if shared:
        Path(shared).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(shared) / path.name)
    return path


def sign_in(driver: webdriver.Chrome, base_url: str, key: str) -> None:
    driver.get(base_url + "/admin")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
