"""Every flag that names an output refuses, before any work, a path that is one of the command's
inputs or lies inside a checkpoint, run, export or model folder (``eval --report STEP/soul.json``
once overwrote the checkpoint it had just evaluated, ``plot RUN --out RUN/metrics.jsonl`` the
run's metrics). Every refused input is read back byte for byte afterwards."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from agiasi.cli import main
from tests.helpers import cli_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_phi3_tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs") / "run"
    args = cli_args("train", base_model=tiny_phi3_tok, output_dir=folder, max_steps=1)
    fast = ["--quantization", "none", "--max-length", "32", "--no-progress", "--save-steps", "1"]
    assert main([*args, *fast]) == 0
    export = folder.parent / "export"
    assert main(["export", str(folder / "step_1"), "--out", str(export), "--gguf", "",
                 "--no-measure"]) == 0  # fmt: skip
    return folder


def _digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _task_file(tmp_path):
    item = {"q_id": 1, "question": "質問", "label": 0,
            **{f"choice{i}": f"選択{i}" for i in range(5)}}  # fmt: skip
    p = tmp_path / "items.jsonl"
    p.write_text(json.dumps(item, ensure_ascii=False) + "\n", encoding="utf-8")
    return p


def cases(run, tiny_phi3_tok, tmp_path):
    step = run / "step_1"
    export = run.parent / "export"
    items = _task_file(tmp_path)
    ev = ["eval", str(step), "--task", "jcommonsenseqa", "--limit", "1"]
    return {
        "report over the checkpoint's soul.json": (
            [*ev, "--report", str(step / "soul.json")], "which this command reads"),
        "report into the checkpoint": (
            [*ev, "--report", str(step / "report.json")], "which this command reads"),
        "report over the task data": (
            [*ev, "--task-data", str(items), "--report", str(items)], "which this command reads"),
        "report over a compared model": (
            ["eval", "--task", "jcommonsenseqa", "--limit", "1", "--compare",
             f"{tiny_phi3_tok},{step}", "--report", str(tiny_phi3_tok / "r.json")],
            "which this command reads"),
        "report inside a run folder": (
            [*ev, "--report", str(run / "jglue.json")], "inside a training run folder"),
        "report inside an export": (
            [*ev, "--report", str(export / "jglue.json")], "inside an export folder"),
        "report inside another model folder": (
            [*ev, "--report", str(export / "hf" / "r.json")], "inside a model folder"),
        "report is a folder": ([*ev, "--report", str(tmp_path)], "is a folder; name a file"),
        "plot over the metrics": (
            ["plot", str(run), "--out", str(run / "metrics.jsonl")], "which this command reads"),
        "plot into a checkpoint": (
            ["plot", str(run), "--out", str(step / "p.png")], "inside a checkpoint"),
        "plot into an export": (
            ["plot", str(run), "--out", str(export / "p.png")], "inside an export folder"),
        "export into the run folder": (
            ["export", str(step), "--out", str(run / "exp"), "--no-measure"], "overlaps"),
        "export into a model folder": (
            ["export", str(step), "--out", str(export / "hf" / "x"), "--no-measure"],
            "inside a model folder"),
        "export --force over its own --imatrix": (
            ["export", str(step), "--out", str(export), "--force", "--no-measure", "--gguf",
             "q4_k_m", "--imatrix", str(export / "imatrix.gguf")], "the --imatrix file"),
        "export over its --text": (
            ["export", str(step), "--out", str(items), "--text", str(items)], "the --text file"),
    }  # fmt: skip


CASE_NAMES = [
    "report over the checkpoint's soul.json", "report into the checkpoint",
    "report over the task data", "report over a compared model", "report inside a run folder",
    "report inside an export", "report inside another model folder", "report is a folder",
    "plot over the metrics", "plot into a checkpoint", "plot into an export",
    "export into the run folder", "export into a model folder",
    "export --force over its own --imatrix", "export over its --text",
]  # fmt: skip


@pytest.mark.parametrize("name", CASE_NAMES)
def test_an_output_over_an_input_is_refused_before_any_work(
    run, tiny_phi3_tok, tmp_path, capsys, name
):
    (run.parent / "export" / "imatrix.gguf").write_bytes(b"GGUF-stand-in")
    argv, message = cases(run, tiny_phi3_tok, tmp_path)[name]
    before = {f: _digest(f) for f in (run, run.parent / "export", tiny_phi3_tok, tmp_path)}
    t0 = time.monotonic()
    assert main(argv) == 2
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agiasi: error: ") and message in err[0], err
    assert took < 20, f"refused only after {took:.0f} s of work"
    for folder, digest in before.items():
        assert _digest(folder) == digest, f"{folder} changed"


def test_the_plot_still_goes_where_the_run_keeps_it(run, capsys):
    assert main(["plot", str(run), "--out", str(run / "phase_transition.png")]) == 0
    assert main(["plot", str(run), "--out", str(run)]) == 0
    assert (run / "phase_transition.png").stat().st_size > 1000
