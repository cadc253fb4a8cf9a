"""What a user watches while training: every data kind trains, the LR schedule, validation with
a best step and early stopping, exact resume through warm-up and decay, packing, `agiasi data`."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from agiasi.cli import main
from agiasi.train.schedule import lr_factor
from tests.helpers import cli_args, cli_cmd, step_tensors
from tests.unit.data.test_data import (
    ALPACA,
    KINDS,
    MESSAGES,
    PROMPT_COMPLETION,
    SHAREGPT,
    _write_kind,
)

pytestmark = pytest.mark.slow
FAST = ["--quantization", "none", "--max-length", "64", "--lora-dropout", "0", "--no-progress"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def train(model, run, steps, *extra, save=None) -> int:
    args = cli_args("train", base_model=model, output_dir=run, max_steps=steps)
    return main([*args, "--save-steps", str(save or steps), *FAST, *extra])


# every format in one file kind: training sees all five through one run (per-file detection)
FORMAT_ROWS = {
    "text": {"text": "日本語の文章です。二つ目の文です。"},
    "messages": {"messages": MESSAGES},
    "alpaca": ALPACA,
    "sharegpt": SHAREGPT,
    "prompt-completion": PROMPT_COMPLETION,
}


@pytest.mark.parametrize("kind", ["txt", *KINDS])
def test_every_format_in_every_file_kind_trains(tiny_phi3_tok, tmp_path, kind, capsys):
    if kind == "txt":
        p = tmp_path / "d.txt"
        p.write_text("一つ目の文書です。\n\n二つ目の文書です。\n")
        sources, formats = [str(p)], ["text"]
    else:
        sources, formats = [], []
        for fmt, rec in FORMAT_ROWS.items():
            if kind in ("csv", "tsv") and fmt not in ("text", "prompt-completion"):
                continue  # nested lists have no CSV form
            sources.append(_write_kind(kind, tmp_path / fmt.replace("-", "_"), [rec] * 3))
            formats.append(fmt)
    run = tmp_path / "run"
    assert train(tiny_phi3_tok, run, 2, "--dataset", ",".join(sources)) == 0
    err = capsys.readouterr().err
    for fmt in formats:
        assert f"format {fmt} (detected)" in err
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert (run / "step_2" / "adapter_model.safetensors").is_file()


def test_lr_in_metrics_follows_the_schedule(tiny_phi3_tok, tmp_path):
    run = tmp_path / "run"
    extra = ("--lr-scheduler", "linear", "--lr-warmup-steps", "3", "--min-lr-ratio", "0.1")
    assert train(tiny_phi3_tok, run, 10, "--learning-rate", "1e-3", *extra) == 0
    got = [r["lr"] for r in metrics(run)]
    want = [1e-3 * lr_factor(s, "linear", 3, 10, 0.1) for s in range(10)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == 0 and got[3] == pytest.approx(1e-3)


def _train_cmd(model, run, extra=()):
    return cli_cmd(
        "train",
        *extra,
        base_model=model,
        output_dir=run,
        max_steps=12,
        save_steps=2,
        seed=5,
        lora_dropout=0.1,
        quantization="none",
        max_length=48,
        batch_size=2,
        learning_rate=1e-3,
        lr_scheduler="cosine",
        lr_warmup_steps=5,
        min_lr_ratio=0.1,
        progress=False,
    )


@pytest.mark.parametrize("nth", [3, 9], ids=["in-warm-up", "in-decay"])
def test_kill_inside_the_lr_schedule_then_resume_is_bit_exact(tiny_phi3_tok, tmp_path, nth):
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(tiny_phi3_tok, ref), check=True, capture_output=True)
    run = tmp_path / "run"
    env = {**os.environ, "AGIASI_FAULT": f"step_start:{nth + 1}"}
    killed = subprocess.run(_train_cmd(tiny_phi3_tok, run), env=env, capture_output=True)
    assert killed.returncode == -9
    assert not (run / "step_12").exists()
    resumed = subprocess.run(
        _train_cmd(tiny_phi3_tok, run, ["--resume", "auto"]), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = step_tensors(ref / "step_12"), step_tensors(run / "step_12")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["lr"] for r in metrics(ref)] == [r["lr"] for r in metrics(run)]


def test_validation_best_step_and_export_step(tiny_phi3_tok, tmp_path, capsys):
    from agiasi.shipped import default_heldout

    run = tmp_path / "run"
    extra = ("--eval-dataset", str(default_heldout()), "--eval-max-tokens", "600")
    assert train(tiny_phi3_tok, run, 6, *extra, save=3) == 0
    rows = metrics(run)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]  # default: at every save
    assert all(r["eval_tokens"] > 500 and r["eval_ppl"] > 1 for r in evals)
    best = json.loads((run / "best.json").read_text())
    want = min(evals, key=lambda r: r["eval_loss"])
    assert best["step"] == want["step"] and best["eval_loss"] == want["eval_loss"]
    manifest = json.loads((run / f"step_{best['step']}" / "soul.json").read_text())
    assert manifest["eval"]["eval_loss"] == want["eval_loss"]
    assert "best step_" in capsys.readouterr().err
    assert (run / "phase_transition.png").read_bytes()[:4] == b"\x89PNG"  # loss, eval, α, LR
    # `export RUN --step best` picks that folder; a run without validation has no best
    from agiasi.checkpoint.run_folder import resolve_step

    assert resolve_step(run, "best") == run / f"step_{best['step']}"
    assert resolve_step(run, "last") == run / "step_6"
    assert resolve_step(run, "3") == run / "step_3"
    other = tmp_path / "plain"
    assert train(tiny_phi3_tok, other, 2) == 0
    capsys.readouterr()
    rc = main(["export", str(other), "--out", str(tmp_path / "x"), "--step", "best"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has no best.json: it was trained without validation" in err
    assert not (tmp_path / "x").exists()


def test_eval_split_and_early_stopping(tiny_phi3_tok, tmp_path, capsys):
    data = tmp_path / "d.txt"
    from agiasi.shipped import default_dataset

    lines = default_dataset().read_text().splitlines()[:120]
    data.write_text("\n\n".join(lines))  # 120 documents
    run = tmp_path / "run"
    extra = ("--dataset", str(data), "--eval-split", "0.1", "--eval-steps", "1")
    # a learning rate this high makes the validation loss rise and fall: patience runs out
    flags = (*extra, "--learning-rate", "0.05", "--lr-scheduler", "constant")
    rc = train(tiny_phi3_tok, run, 40, *flags, "--early-stopping-patience", "2", save=100)
    assert rc == 0
    err = capsys.readouterr().err
    assert "12 held-out documents (--eval-split)" in err
    rows = metrics(run)
    assert len(rows) < 40 and "early stopping: 2 validation(s) without a new best" in err
    best = json.loads((run / "best.json").read_text())
    last = rows[-1]["step"]
    evals = [r["eval_loss"] for r in rows]
    assert best["eval_loss"] == min(evals) and evals.index(min(evals)) + 1 == best["step"]
    assert last - best["step"] == 2
    # both the best and the last step are kept
    assert (run / f"step_{best['step']}" / "soul.pt").is_file()
    assert (run / f"step_{last}" / "soul.pt").is_file()


def test_packing_trains_fewer_rows_with_the_same_tokens(tiny_phi3_tok, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    recs = [{"messages": MESSAGES[1:3]}, {"messages": MESSAGES[3:]}] * 20
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    run = tmp_path / "run"
    wide = ("--max-length", "256")  # after FAST's 64: the later flag wins
    assert train(tiny_phi3_tok, run, 2, "--dataset", str(data), "--packing", *wide) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "packed from 40 examples" in x)
    rows = int(line.split(": ")[2].split(" rows")[0])
    assert rows < 40 / 2
    assert train(tiny_phi3_tok, tmp_path / "r2", 2, "--dataset", str(data), *wide) == 0
    unpacked = capsys.readouterr().err
    plain = next(y for y in unpacked.splitlines() if " rows" in y)
    tokens = [
        int(re.search(r"([\d,]+) tokens", x).group(1).replace(",", "")) for x in (line, plain)
    ]
    assert tokens[0] == tokens[1]


def test_data_preview_of_the_shipped_sample_and_an_alpaca_file(tmp_path, capsys):
    from agiasi.shipped import default_dataset

    assert main(["data", str(default_dataset()), "--max-length", "256"]) == 0
    out = capsys.readouterr().out
    assert "kind     text; format text (detected)" in out
    assert "--max-length 256: packed into" in out and "every token trained" in out
    p = tmp_path / "a.jsonl"
    long = {"instruction": "長い質問" * 200, "output": "答え"}
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [ALPACA, long, ALPACA]))
    assert main(["data", str(p), "--max-length", "128"]) == 0
    out = capsys.readouterr().out
    assert "format alpaca (detected)" in out and "records  3" in out
    assert "--max-length 128: 1 of 3 conversations would be cut" in out
    assert "roles    assistant 5, system 2, user 5" in out
    assert "⟦I like cats.<|end|>" in out and "⟦3776メートルです。<|end|>" in out
    assert "⟦次の文を" not in out  # the question is not trained
    assert main(["data", str(p), "--sample", "2", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["sources"][0]["records"] == 2 and s["sources"][0]["sampled"] is True


BAD_TRAIN = {
    "both_eval": (
        ("--eval-split", "0.1", "--eval-dataset", "x.txt"),
        "either --eval-dataset or --eval-split",
    ),
    "patience_no_eval": (
        (
            "--early-stopping-patience",
            "2",
        ),
        "needs validation data",
    ),
    "one_doc_split": (("--eval-split", "0.5"), "leaves no validation document"),
    "bad_columns": (("--dataset-columns", "nope"), "is not FIELD=COLUMN"),
}


@pytest.mark.parametrize("case", BAD_TRAIN)
def test_bad_trainer_flags_one_line_nothing_written(tiny_phi3_tok, tmp_path, capsys, case):
    flags, message = BAD_TRAIN[case]
    run = tmp_path / "run"
    assert train(tiny_phi3_tok, run, 2, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("agiasi: error: ") and message in err[-1]
    assert not run.exists()
