"""Evaluate from the page (issue 46's second part): `agiasi eval --compare` on JCommonsenseQA
items run as a subprocess, its table shown as the CLI prints it (the same JSON through the same
formatter) with the verdict, and the items on which the models disagree with each one's pick."""

from __future__ import annotations

import json

import pytest

from agiasi.cli import main
from agiasi.eval.benchmark import format_benchmark
from agiasi.shipped import tiny_model_path
from tests.browser.common import open_page, shot, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_compare_base_and_a_step_on_jcqa_items(studio, browser):
    run = studio.root / "runs" / "a"
    args = ["train", "--base-model", str(tiny_model_path()), "--max-steps", "6", "--save-steps",
            "6", "--max-length", "64", "--learning-rate", "2e-3", "--no-progress",
            "--output-dir", str(run)]  # fmt: skip
    assert main(args) == 0
    page = open_page(browser, studio.url + "#eval", "en-US")
    page.fill("#v-compare", f"{tiny_model_path()},runs/a/step_6")
    page.fill("#v-task", "jcommonsenseqa")
    page.fill("#v-limit", "50")
    wait_until(
        lambda: "--limit 50" in (page.text_content("#eval-command") or ""), 20, "the command"
    )
    page.click("#eval-start")
    wait_until(
        lambda: page.get_attribute("#eval-state", "data-state") == "finished", 300, "the evaluation"
    )
    reports = list((studio.root / ".agiasi-studio" / "evals").glob("*.report.json"))
    (report_file,) = reports
    report = json.loads(report_file.read_text(encoding="utf-8"))
    assert page.text_content("#eval-table") == format_benchmark(report)
    verdict = report["tasks"]["jcommonsenseqa"]["compare"][0]["verdict"]
    assert verdict in page.text_content("#eval-table")
    per = [r["per_item"] for r in report["tasks"]["jcommonsenseqa"]["results"]]
    differ = sum(a["pred"] != b["pred"] for a, b in zip(*per, strict=True))
    rows = page.locator("#eval-disagree tr").count()
    assert rows == (differ + 1 if differ else 0)
    shot(page, "eval_en")
    # held-out perplexity the same way: no task, the same two models
    page.fill("#v-task", "")
    page.fill("#v-limit", "")
    page.fill("#v-max_tokens", "1024")
    wait_until(lambda: "--task" not in (page.text_content("#eval-command") or "x--task"), 20,
               "the perplexity command")  # fmt: skip
    page.click("#eval-start")
    wait_until(
        lambda: (
            page.get_attribute("#eval-state", "data-state") == "finished"
            and "perplexity" in (page.text_content("#eval-table") or "")
        ),
        300,
        "the perplexities",
    )
    from agiasi.eval.entry import format_perplexities

    ppl = [json.loads(f.read_text(encoding="utf-8")) for f in
           (studio.root / ".agiasi-studio" / "evals").glob("*.report.json")]  # fmt: skip
    (ppl,) = [r for r in ppl if r.get("kind") == "perplexity"]
    assert page.text_content("#eval-table") == format_perplexities(ppl)
    assert [r["model"] for r in ppl["rows"]][1].endswith("runs/a/step_6")
    shot(page, "eval_perplexity_en")
    assert not page.problems, page.problems
