"""Helpers of the reliability tests: the quick training flags, running a command and reading
its one error line, copies and snapshots of run folders."""

from __future__ import annotations

import shutil
from pathlib import Path

from agiasi.cli import main
from tests.helpers import cli_args

FAST = ["--quantization", "none", "--max-length", "32", "--save-steps", "2", "--no-progress"]


TINY = ["--quantization", "none", "--max-length", "32", "--lora-dropout", "0", "--no-progress"]


def one_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.startswith("agiasi: error:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    return lines[0]


def train_argv(model: Path, out: Path, steps: int = 2, *extra: str) -> list[str]:
    return [
        "train",
        "--base-model",
        str(model),
        "--output-dir",
        str(out),
        "--max-steps",
        str(steps),
        *FAST,
        *extra,
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def train(model, run, steps, *extra, save=None):
    args = cli_args("train", base_model=model, output_dir=run, max_steps=steps)
    return main([*args, "--save-steps", str(save or steps), *TINY, *extra])


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("agiasi: error: "), lines[-5:]
    return lines[-1]
