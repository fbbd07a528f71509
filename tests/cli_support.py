"""Helpers for the tests that drive `cogpipe` as a child process, a headless browser, or a
server: one way to start the command, one set of Chromium flags, one screenshot rule.

The command runs as `python -m cogpipe.cli` with this interpreter, so a test uses the
checkout's package whether or not the `cogpipe` script is installed. The browser is
Debian's `chromium` with `chromium-driver` (`make browser` installs them where it can);
without them the test that asks for one skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Headless, no sandbox (root in containers), nothing fetched in the background, and a
# window large enough that the Prefect UI lays out its desktop form.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def cogpipe_command(*args: str) -> list[str]:
    """The argv of `cogpipe ARGS` with this interpreter (no installed script needed)."""
    return [sys.executable, "-m", "cogpipe.cli", *args]


def run_cogpipe(
    *args: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run `cogpipe ARGS` to its end with its output captured as text, and assert it exited
    0 (the end of what it wrote is the failure's message).

    Args:
        args: the command line after `cogpipe`.
        env: the child's whole environment.
        timeout: seconds before subprocess kills it (TimeoutExpired).

    Returns:
        The finished process: `stdout` and `stderr` for the test to check.
    """
    proc = subprocess.run(
        cogpipe_command(*args), env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tiny_video_args(model: Path, steps: int) -> list[str]:
    """`generate`/`sweep` flags for the tiny CogVideoX at `model`: `steps` denoising steps
    of a 9-frame 32x32 video on the CPU, a few seconds a video."""
    size = ["--frames", "9", "--height", "32", "--width", "32"]
    return ["--model", str(model), "--steps", str(steps), *size, "--device", "cpu"]


def find_chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths; skips the test when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    return chromium, driver


def open_chromium(found: tuple[str, str], page_load_timeout: float):
    """A new headless Chromium session, with its own profile, through `find_chromium()`'s
    paths; the caller quits it. A page that takes longer than `page_load_timeout` seconds
    to load fails the test instead of hanging it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    browser.set_page_load_timeout(page_load_timeout)
    return browser


def save_screenshot(browser, path: Path) -> Path:
    """The browser's page as a PNG at `path`, also copied into $COGPIPE_SCREENSHOTS when it
    is set (docs/screenshots: the pictures the README shows)."""
    assert browser.save_screenshot(str(path)), path.name
    if keep := os.environ.get("COGPIPE_SCREENSHOTS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path
