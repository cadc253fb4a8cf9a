"""The studio as a user meets it: a real Chromium on a real server, on the shipped tiny model.

A run is prepared (model, data preview), started from the generated form, watched as its charts
gain points and its phase moves, the page reloaded mid-run (the whole history comes back),
stopped, resumed and finished; the server restarted mid-run loses nothing; the run the page
started equals the command the page showed; hostile text in data stays text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.browser.common import Studio, open_page, shot, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def points(page, chart: str = "loss") -> int:
    value = (
        page.get_attribute(f"#chart-{chart}", "data-points")
        if page.locator(f"#chart-{chart}").count()
        else None
    )
    return int(value or 0)


def state(page) -> str:
    return page.get_attribute("#progress", "data-state") or ""


def fill_form(page, **values):
    page.click("button[data-tab=train]")
    for name, value in values.items():
        page.fill(f"#f-{name}", str(value))
    wait_until(lambda: page.text_content("#command").count("--") >= len(values), 20, "the command")


def prepare(page):
    page.click("#use-shipped")
    page.wait_for_selector("#model-info tr")
    page.click("button[data-tab=data]")
    page.click("#use-sample")
    page.wait_for_selector("#data-summary .source", timeout=60_000)


def test_prepare_start_watch_reload_stop_resume_finish_in_japanese(studio, browser):
    page = open_page(browser, studio.url, "ja-JP")
    assert page.get_attribute("html", "lang") == "ja"
    assert page.text_content("button[data-tab=train]") == "学習"
    prepare(page)
    shot(page, "data_ja")
    summary = page.text_content("#data-summary")
    assert "text" in summary and "トークン" in summary
    # a value out of bounds: the CLI's own line, at the field, and no start
    fill_form(page, max_steps=0)
    wait_until(lambda: page.text_content("#e-max_steps"), 20, "the field's error")
    assert page.text_content("#e-max_steps") == "--max-steps must be at least 1, got 0"
    assert page.is_disabled("#start")
    fill_form(page, max_steps=40, max_length=64, save_steps=10, warmup_steps=2,
              annealing_steps=12, learning_rate="1e-3", output_dir="runs/web")  # fmt: skip
    assert not page.is_disabled("#start")
    shot(page, "train_ja")
    command = page.text_content("#command")
    assert command.startswith("agiasi train --base-model ") and "--output-dir runs/web" in command
    page.click("#start")
    wait_until(lambda: points(page) >= 3, 120, "the loss chart's first points")
    # the reload: every point so far comes back from the run folder
    before = points(page)
    page.reload()
    wait_until(lambda: points(page) >= before, 30, "the history after a reload")
    wait_until(lambda: state(page) == "running", 30, "the running state")
    page.click("#stop")
    wait_until(lambda: state(page) == "stopped", 120, "the stop")
    saved = sorted(int(p.name[5:]) for p in (studio.root / "runs/web").glob("step_*"))
    assert saved and saved[-1] == int(page.get_attribute("#progress", "data-step"))
    assert saved[-1] < 40
    page.click("#resume")
    wait_until(lambda: state(page) == "finished", 240, "the resumed run's end")
    wait_until(lambda: points(page) == 40, 30, "every step on the chart")
    rows = [
        json.loads(x) for x in (studio.root / "runs/web/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[0]["phase"].startswith("🔵") and rows[-1]["phase"].startswith("🟢")
    shot(page, "watch_ja")
    # the run list shows it finished
    page.click("button[data-tab=runs]")
    wait_until(lambda: "完了" in (page.text_content("#runs") or ""), 10, "the run list")
    assert not page.problems, page.problems


def test_the_page_started_run_equals_the_command_it_showed(studio, browser, tmp_path):
    page = open_page(browser, studio.url, "en-US")
    assert page.get_attribute("html", "lang") == "en"
    page.click("#use-shipped")
    page.wait_for_selector("#model-info tr")
    fill_form(page, dataset=str(__import__("agiasi.shipped").shipped.default_dataset()),
              max_steps=6, max_length=48, save_steps=3, lora_dropout=0, output_dir="runs/page")  # fmt: skip
    shown = page.text_content("#command")
    page.click("#start")
    wait_until(lambda: state(page) == "finished", 180, "the run's end")
    shot(page, "watch_en")
    argv = shown.split()[2:]  # the command as shown, another output folder
    argv[argv.index("runs/page")] = str(tmp_path / "cli")
    done = subprocess.run([sys.executable, "-m", "agiasi", "train", *argv, "--no-progress"],
                          cwd=studio.root, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    timing = {"step_time_s", "tokens_per_s", "sync_wait_s", "peak_mem_gib", "compute_s_prev", "peak_reserved_gib",
              "compute_s_prev_rank_std"}  # fmt: skip

    def lines(run):
        return [{k: v for k, v in json.loads(x).items() if k not in timing}
                for x in (run / "metrics.jsonl").read_text().splitlines()]  # fmt: skip

    page_run, cli_run = studio.root / "runs/page", tmp_path / "cli"
    assert lines(page_run) == lines(cli_run)
    assert sorted(p.name for p in page_run.iterdir()) == sorted(p.name for p in cli_run.iterdir())
    from safetensors.torch import load_file

    for step in ("step_3", "step_6"):
        a = load_file(str(page_run / step / "adapter_model.safetensors"))
        b = load_file(str(cli_run / step / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not page.problems, page.problems


def test_a_restarted_server_loses_nothing(studio, browser):
    page = open_page(browser, studio.url, "en-US")
    prepare(page)
    fill_form(page, max_steps=400, max_length=64, save_steps=1000, output_dir="runs/long")
    page.click("#start")
    wait_until(lambda: points(page) >= 3, 120, "the first points")
    studio.stop()  # the server goes; the run goes on
    restarted = Studio(studio.root, studio.port).start()
    try:
        page.reload()
        wait_until(lambda: state(page) == "running", 30, "the run, seen by the new server")
        before = points(page)
        wait_until(lambda: points(page) > before, 60, "new points through the new server")
        second = page.context.new_page()  # a second tab shows the same
        second.goto(page.url)
        wait_until(lambda: points(second) >= before, 30, "the history in a second tab")
        page.click("#stop")
        wait_until(lambda: state(page) == "stopped", 120, "the stop")
    finally:
        restarted.stop()
    assert not page.problems, page.problems


def test_markup_in_data_and_errors_stays_text(studio, browser):
    hostile = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    (studio.root / "evil.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": hostile},
                                 {"role": "assistant", "content": hostile}]}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    shutil.copy(studio.root / "evil.jsonl", studio.root / "<b>x<i>.jsonl")
    page = open_page(browser, studio.url, "en-US")
    page.click("#use-shipped")
    page.wait_for_selector("#model-info tr")
    page.click("button[data-tab=data]")
    page.fill("#data-path", "evil.jsonl")
    page.click("#preview")
    page.wait_for_selector("#data-summary .source")
    assert hostile in page.text_content("#data-summary")
    assert page.locator("#data-summary script, #data-summary img").count() == 0
    assert page.locator("#files li", has_text="<b>x<i>.jsonl").count() == 1  # a name, shown as text
    page.fill("#data-path", "nothing-here.jsonl")
    page.click("#preview")
    wait_until(lambda: page.text_content("#data-error"), 20, "the error line")
    assert "nothing-here.jsonl" in page.text_content("#data-error")
    assert not page.problems, page.problems  # no dialog fired, no script ran


def _estimate(page) -> float:
    wait_until(lambda: page.get_attribute("#estimate", "data-state") == "done", 60, "the estimate")
    return float(page.get_attribute("#estimate", "data-card"))


@pytest.mark.parametrize("locale", ["ja-JP", "en-US"])
def test_the_estimate_beside_the_form_follows_the_fields_and_equals_the_cli(
    studio, browser, locale
):
    page = open_page(browser, studio.url, locale)
    page.click("#use-shipped")
    page.wait_for_selector("#model-info tr")
    fill_form(page, max_length=256, batch_size=1)
    first = _estimate(page)
    parts = page.locator("#estimate-parts tr").count()
    assert parts >= 6  # weights, adapter, checkpoints, layer, head, workspace, allocator
    # a longer micro-batch: the page asks again and predicts more
    page.fill("#f-batch_size", "8")
    wait_until(lambda: _estimate(page) > first, 60, "a larger estimate")
    shot(page, f"estimate_{locale[:2]}")
    # the figure is the CLI's for the same flags
    flags = page.text_content("#command").split()[2:]
    cli = subprocess.run([sys.executable, "-m", "agiasi", "estimate", *flags, "--json"],
                         cwd=studio.root, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout.strip().splitlines()[-1])["card_gib"] == _estimate(page)
    words = {"ja-JP": "予測ピーク", "en-US": "Predicted peak"}[locale]
    assert words in page.text_content("#estimate-peak")
    assert not page.problems, page.problems
