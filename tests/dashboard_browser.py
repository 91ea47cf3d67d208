"""TensorBoard on a log directory, and the keras_colopt dashboard open in headless Chromium.

Shared by `test_dashboard_browser.py`, `benchmarks/dashboard_load.py` and
`benchmarks/dashboard_screenshots.py`. TensorBoard runs as `python -m tensorboard.main` in a
subprocess, so it finds the plugin the way a user's TensorBoard does: through the installed
package's `tensorboard_plugins` entry point. The browser is Debian's `chromium` driven by
selenium through `/usr/bin/chromedriver` (`apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def check_prerequisites() -> None:
    """Raises AssertionError, saying what to install, when the browser, its driver or the
    plugin's entry point is missing (the browser test fails then; it never skips)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    assert not missing, (f"{' and '.join(missing)} not found: the dashboard's browser test "
                         "needs Debian's chromium and chromium-driver. Install them with "
                         "`apt-get install -y chromium chromium-driver` (.ci/run does).")
    names = [ep.value for ep in metadata.entry_points(group="tensorboard_plugins")
             if ep.name == "keras_colopt"]
    assert names == ["keras_colopt.tensorboard.plugin:ColoptPlugin"], (
        "TensorBoard cannot find the keras_colopt plugin: no `tensorboard_plugins` entry "
        "point named keras_colopt is installed. Install the package (`pip install -e "
        f"'.[test]'`). Found: {names}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    output: str  # the file TensorBoard's stdout and stderr go to

    def tail(self, lines: int = 40) -> str:
        with open(self.output, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def tensorboard(logdir, reload_interval: float = 1, timeout: float = 180, extra=()):
    """Runs `python -m tensorboard.main --logdir LOGDIR` on a free port of 127.0.0.1 until
    the block ends, then stops that process (by its own id) and waits for it.

    Yields:
        A `Server`; ready when the block starts (the plugin is listed).
    """
    port = free_port()
    out = tempfile.NamedTemporaryFile("w", prefix="tensorboard-", suffix=".log", delete=False)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--reload_interval", str(reload_interval), *extra],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    out.close()
    server = Server(f"http://127.0.0.1:{port}", process, out.name)
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"TensorBoard exited with {process.returncode}:\n"
                                   + server.tail())
            try:
                with urllib.request.urlopen(server.url + "/data/plugins_listing",
                                            timeout=5) as r:
                    if b'"keras_colopt"' in r.read():
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"TensorBoard did not serve within {timeout} s:\n"
                                   + server.tail())
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.unlink(out.name)


def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium (selenium) with the browser console log readable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def open_dashboard(driver, url: str, timeout: float = 90) -> None:
    """Opens TensorBoard's keras_colopt tab, switches into the plugin's iframe and waits
    until the dashboard has drawn its first data."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/#keras_colopt")
    wait = WebDriverWait(driver, timeout)

    def frame(d):
        for f in d.find_elements(By.TAG_NAME, "iframe"):
            if "keras_colopt" in (f.get_attribute("src") or ""):
                return f
        return False

    driver.switch_to.frame(wait.until(frame))
    wait.until(lambda d: d.execute_script("return document.body && document.body.dataset.state")
               == "ready")


def select_run(driver, run: str, timeout: float = 30) -> None:
    """Picks `run` in the dashboard's run selector and waits until it is drawn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    Select(driver.find_element(By.ID, "colopt-run")).select_by_value(run)
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return document.body.dataset.run === arguments[0] && "
        "document.body.dataset.state === 'ready'", run))


def _frame_element(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('iframe')].find("
        "  (e) => (e.src || '').includes('keras_colopt'));")


def full_screenshot(driver, path, width: int = 1400) -> None:
    """Saves TensorBoard's page with the whole dashboard in view: the window keeps its
    width and is made as tall as TensorBoard's header plus the dashboard's content. Called
    and returns inside the plugin's iframe; the tooltip is hidden first."""
    driver.execute_script("const t = document.getElementById('colopt-tip');"
                          "if (t) t.style.display = 'none';")
    content = driver.execute_script(
        "return Math.ceil(document.getElementById('colopt').getBoundingClientRect().bottom"
        " + window.scrollY) + 16")
    driver.switch_to.default_content()
    height = driver.get_window_size()["height"]
    for _ in range(4):  # TensorBoard lays the iframe out in what the window leaves it
        shown = driver.execute_script("return arguments[0].getBoundingClientRect().height",
                                      _frame_element(driver))
        if shown >= content:
            break
        height += int(content - shown)
        driver.set_window_size(width, height)
        time.sleep(0.5)
    driver.save_screenshot(str(path))
    driver.switch_to.frame(_frame_element(driver))


def plugin_errors(driver) -> list:
    """The browser console's errors that come from the plugin's own files."""
    return [e for e in driver.get_log("browser")
            if e.get("level") == "SEVERE" and "keras_colopt" in e.get("message", "")]


def copy_runs(pairs, into) -> None:
    """Copies log folders (`[(source, name)]`) under `into`, event files byte for byte."""
    for source, name in pairs:
        shutil.copytree(source, os.path.join(into, name))
