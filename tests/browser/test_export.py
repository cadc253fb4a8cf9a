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
    page.fill("#x-imatrix", "none")
    # the type table: sizes from the base's parameters, the matrix marks, a tick is --gguf
    size = lambda t: page.text_content(f"#gguf-types tr[data-type={t}] td:nth-child(4)")  # noqa: E731
    wait_until(lambda: "–" not in (size("q8_0") or "–"), 30, "the sizes")
    assert "required" in page.text_content("#gguf-types tr[data-type=iq2_xs]") or "必須" in (
        page.text_content("#gguf-types tr[data-type=iq2_xs]")
    )
    page.check("#gguf-types tr[data-type=q8_0] input")
    page.check("#gguf-types tr[data-type=q4_k_m] input")
    assert page.input_value("#x-gguf") == "q8_0,q4_k_m"
    wait_until(lambda: "--gguf q8_0,q4_k_m" in (page.text_content("#export-command") or ""), 20,
               "the command")  # fmt: skip
    assert page.text_content("#export-command") == (
        "agiasi export runs/a --out exports/a --step last --gguf q8_0,q4_k_m --imatrix none"
    )
    page.fill("#x-gguf", "q3_x")  # an unknown type: the CLI's line, no start
    wait_until(lambda: "q3_x" in (page.text_content("#export-form-error") or ""), 20, "the error")
    assert page.is_disabled("#export-start")
    page.fill("#x-gguf", "q8_0,q4_k_m")
    wait_until(lambda: not page.is_disabled("#export-start"), 20, "the start button")
    page.click("#export-start")
    wait_until(
        lambda: page.get_attribute("#export-state", "data-state") == "finished", 300, "the export"
    )
    report = json.loads((studio.root / "exports/a/export_report.json").read_text(encoding="utf-8"))
    assert page.text_content("#export-report") == format_report(report)
    assert "gguf q8_0 vs hf" in page.text_content("#export-report")
    assert "q4_k_m" in page.text_content("#export-report")
    # the estimate beside each type: the parameters × bits per weight, near the file written
    from agiasi.gguf.file_types import GGUF_TYPE_TABLE

    written = (studio.root / "exports/a/tiny-ja-phi3-agiasi-q8_0.gguf").stat().st_size
    shown = float(size("q8_0").split()[1])  # "≈ 9.9 MiB"
    assert shown * 2**20 == pytest.approx(written, rel=0.2)
    assert GGUF_TYPE_TABLE["q8_0"].bpw == 8.5
    assert "ollama create a -f exports/a/Modelfile" in page.text_content("#export-run")
    # the Modelfile prefers Q4_K_M (export.files.modelfile)
    assert "\nFROM ./tiny-ja-phi3-agiasi-q4_k_m.gguf\n" in page.text_content("#export-modelfile")
    assert "Modelfile" in page.text_content("#export-files")
    shot(page, "export_ja")
    # the run's page links the export, found from the files: also after a studio restart
    page.goto(studio.url + "#run=runs/a")
    wait_until(lambda: "exports/a" in (page.text_content("#run-exports") or ""), 30, "the link")
    studio.stop()
    studio.start()
    page.reload()
    wait_until(lambda: "exports/a" in (page.text_content("#run-exports") or ""), 30, "the link")
    page.click("#run-exports a")
    wait_until(lambda: page.text_content("#export-title") == "exports/a", 20, "the export page")
    assert not page.problems, page.problems
