"""Export from the page (issue 46's first part): the form generated from ExportConfig, the
command shown, the export run as `agiasi export` and its fidelity report shown as the CLI prints
it (the same JSON through the same formatter), with the files, the Modelfile and how to run it."""

from __future__ import annotations

import json

import pytest

from agiasi.cli import main
from agiasi.export.files import format_report
from agiasi.shipped import tiny_model_path
from tests.browser.common import open_page, shot, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_export_a_finished_run_and_see_its_report(studio, browser):
    run = studio.root / "runs" / "a"
    args = ["train", "--base-model", str(tiny_model_path()), "--max-steps", "4", "--save-steps",
            "2", "--max-length", "48", "--no-progress", "--output-dir", str(run)]  # fmt: skip
    assert main(args) == 0
    page = open_page(browser, studio.url + "#export", "ja-JP")
    page.fill("#x-checkpoint", "runs/a")
    page.fill("#x-step", "last")
    page.fill("#x-out", "exports/a")
    page.fill("#x-gguf", "q8_0")
    page.fill("#x-imatrix", "none")
    wait_until(
        lambda: "--gguf q8_0" in (page.text_content("#export-command") or ""), 20, "the command"
    )
    assert page.text_content("#export-command") == (
        "agiasi export runs/a --out exports/a --step last --gguf q8_0 --imatrix none"
    )
    page.fill("#x-gguf", "q3_x")  # an unknown type: the CLI's line, no start
    wait_until(lambda: "q3_x" in (page.text_content("#export-form-error") or ""), 20, "the error")
    assert page.is_disabled("#export-start")
    page.fill("#x-gguf", "q8_0")
    wait_until(lambda: not page.is_disabled("#export-start"), 20, "the start button")
    page.click("#export-start")
    wait_until(
        lambda: page.get_attribute("#export-state", "data-state") == "finished", 300, "the export"
    )
    report = json.loads((studio.root / "exports/a/export_report.json").read_text(encoding="utf-8"))
    assert page.text_content("#export-report") == format_report(report)
    assert "gguf q8_0 vs hf" in page.text_content("#export-report")
    assert "ollama create a -f exports/a/Modelfile" in page.text_content("#export-run")
    assert "\nFROM ./tiny-ja-phi3-agiasi-q8_0.gguf\n" in page.text_content("#export-modelfile")
    assert "Modelfile" in page.text_content("#export-files")
    shot(page, "export_ja")
    assert not page.problems, page.problems
