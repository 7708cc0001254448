"""The FiftyOne App served by `distillery curate app`, opened in headless Chromium: samples,
their labels and the saved views must render (DOM text and screenshot pixels, not HTTP 200)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco
from distillery.labeling.curation.sync import sync

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _need_browser():
    if CHROMIUM and CHROMEDRIVER:
        return
    msg = "headless Chromium not installed (Debian packages chromium, chromium-driver)"
    if os.environ.get("DISTILLERY_REQUIRE_BROWSER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def app(fo, dataset_name, coco128, tmp_path):
    _need_browser()
    ls, _ = import_coco(LabelStore(tmp_path / "s"), str(coco128 / "annotations.json"), str(coco128 / "images"))
    sync(ls, dataset_name, with_phash=False, progress=False)
    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillery.engine.cli", "curate", "app", "--dataset", dataset_name, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True,
    )

    def up():
        assert proc.poll() is None, (tmp_path / "app.log").read_text()
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait(up, 120, "the App server")
        yield port, proc, dataset_name
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _shot(driver) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(np.int16)


def test_app_renders_samples_labels_and_saved_views(app, browser):
    import psutil
    from selenium.webdriver.common.by import By

    port, proc, name = app
    # bound to loopback only (the default)
    listeners = [c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                 and c.status == psutil.CONN_LISTEN]
    assert listeners and set(listeners) == {"127.0.0.1"}, listeners

    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    browser.get(f"http://127.0.0.1:{port}/datasets/{name}")
    _wait(lambda: "128 samples" in body(), 120, "'128 samples' in the App")
    for e in browser.find_elements(By.XPATH, "//*[text()='Dismiss']"):  # the Enterprise pop-up
        e.click()
    time.sleep(5)  # thumbnails and overlays finish drawing
    with_labels = _shot(browser)
    grid = (slice(160, 880), slice(320, 1380))
    assert with_labels[grid].std() > 30, "the sample grid is blank"

    # labels render: hiding the `pseudo` field changes a good share of the grid's pixels
    label = browser.find_element(By.XPATH, "//span[text()='pseudo']")
    box = label.find_element(By.XPATH, "./ancestor::*[.//input[@type='checkbox']][1]//input[@type='checkbox']")
    assert box.is_selected()
    browser.execute_script("arguments[0].click()", box)
    _wait(lambda: not box.is_selected(), 10, "the pseudo checkbox to clear")
    time.sleep(3)
    without = _shot(browser)
    changed = (np.abs(with_labels[grid] - without[grid]).sum(-1) > 30).mean()
    assert changed > 0.05, f"hiding the labels changed only {changed:.1%} of the grid"

    # a saved view opens by URL: review-queue drops the 2 images without instances
    browser.get(f"http://127.0.0.1:{port}/datasets/{name}?view=review-queue")
    _wait(lambda: "126 samples" in body(), 60, "'126 samples' in the review-queue view")
