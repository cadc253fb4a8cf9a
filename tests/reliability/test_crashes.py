"""Crash anywhere: SIGKILL `agiasi train` / `agiasi export` at chosen moments, then resume.

The fault points are in the code (``agiasi._faults.maybe_crash``) and fire only when the
``AGIASI_FAULT=point:n`` variable is set, so every kill lands at a known place.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agiasi.checkpoint.step_folder import required_files
from tests.helpers import cli_cmd, make_checkpoint, step_tensors

pytestmark = pytest.mark.slow
STEPS = 16


def train_cmd(model, run, extra=()):
    return cli_cmd(
        "train",
        *extra,
        base_model=model,
        output_dir=run,
        max_steps=STEPS,
        save_steps=4,
        warmup_steps=2,
        annealing_steps=10,
        seed=3,
        lora_dropout=0.1,
        quantization="none",
        max_length=48,
        batch_size=2,
        progress=False,
    )


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return step_tensors(run / f"step_{STEPS}")


def assert_every_step_folder_complete(run: Path) -> None:
    for p in run.iterdir():
        if p.name.startswith("step_"):
            for f in (*required_files(), "trainer_state.pt", "train_config.json"):
                assert (p / f).is_file(), f"{p.name} lacks {f}"


@pytest.fixture(scope="module")
def reference(tiny_phi3_tok, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(train_cmd(tiny_phi3_tok, run), check=True, capture_output=True)
    return final_tensors(run)


KILL_POINTS = [
    ("step_start", 3),
    ("after_backward", 6),
    ("checkpoint_written", 1),
    ("checkpoint_written", 3),
    ("checkpoint_renamed", 1),
    ("checkpoint_renamed", 2),
    ("metrics_written", 4),
    ("metrics_written", 9),
    ("step_start", 14),
    ("after_backward", 16),
]


@pytest.mark.parametrize("point, nth", KILL_POINTS, ids=[f"{p}:{n}" for p, n in KILL_POINTS])
def test_kill_then_resume_is_bit_exact(tiny_phi3_tok, tmp_path, reference, point, nth):
    run = tmp_path / "run"
    env = {**os.environ, "AGIASI_FAULT": f"{point}:{nth}"}
    killed = subprocess.run(train_cmd(tiny_phi3_tok, run), env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run / f"step_{STEPS}").exists()
    assert_every_step_folder_complete(run)
    resumed = subprocess.run(
        train_cmd(tiny_phi3_tok, run, ["--resume", "auto"]), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if point == "checkpoint_written":
        assert "half-written" in resumed.stderr  # the killed write is named and removed
    got = final_tensors(run)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k
    assert_every_step_folder_complete(run)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".gguf", ".safetensors")
    }


@pytest.mark.llamacpp
@pytest.mark.parametrize("point", ["export_hf_written:1", "export_gguf_written:1"])
def test_killed_export_leaves_nothing_final_and_rerun_is_correct(tiny_phi3_tok, tmp_path, point):
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    cmd = [
        sys.executable,
        "-m",
        "agiasi",
        "export",
        str(ckpt),
        "--gguf",
        "f32,q8_0",
        "--no-measure",
    ]
    clean = subprocess.run([*cmd, "--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / "out"
    killed = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, env={**os.environ, "AGIASI_FAULT": point}
    )
    assert killed.returncode == -9
    assert not out.exists()  # no partial file under a final name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    rerun = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "left half-written by a killed export" in rerun.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _digest(out) == _digest(tmp_path / "clean")
