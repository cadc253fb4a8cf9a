"""Fixtures of the reliability tests: finished runs to export, resume and damage (one per test
module, as before)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agiasi.cli import main
from tests.reliability.common import train, train_argv


@pytest.fixture(scope="module")
def finished_run(tiny_phi3_tok, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(tiny_phi3_tok, run)) == 0
    return run


@pytest.fixture(scope="module")
def finished(tiny_phi3_tok, tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    assert train(tiny_phi3_tok, run, 2) == 0
    return run
