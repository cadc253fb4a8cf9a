"""Helpers of the browser tests: a real studio server (``python -m agiasi studio``), a page in a
real Chromium driven by Playwright, waiting and screenshots.

Chromium is Debian's (``apt-get install chromium``: the README's test command installs it);
Playwright's own browser download needs network. Screenshots go to ``test-artifacts/studio/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from agiasi.testing.studio import StudioProcess, free_port  # noqa: F401  (re-exported)

CHROMIUM = os.environ.get("AGIASI_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "studio"


Studio = StudioProcess  # the real server in a subprocess (agiasi.testing.studio)


def open_page(browser, url: str, locale: str):
    """A laptop-sized tab; any page error or dialog (an injected script would make one) fails."""
    context = browser.new_context(viewport={"width": 1366, "height": 800}, locale=locale)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(url)
    return page


def wait_until(fn, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
