"""Fixtures of the browser tests: a studio server on a fresh root, one Chromium per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.browser.common import CHROMIUM, Studio, free_port


@pytest.fixture()
def studio(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    s = Studio(root, free_port()).start()
    yield s
    s.stop()
    # runs the test left going (they are detached from the server on purpose)
    subprocess.run(["pkill", "-INT", "-f", f"agiasi train.*{root}"], check=False)


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set AGIASI_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()
