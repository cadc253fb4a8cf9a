"""A run never destroys another, a stop or a crash loses nothing, and a resume continues exactly
what it says: run folders, the lock, --overwrite, SIGTERM, divergence, changed settings, disk
full.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from agiasi.cli import main
from tests.helpers import cli_args, cli_cmd
from tests.reliability.common import (
    copy_run,
    last_error,
    one_error,
    snapshot,
    train,
    train_argv,
)

pytestmark = pytest.mark.slow


def test_a_new_run_over_a_finished_one_is_refused_and_touches_nothing(
    finished_run, tiny_phi3_tok, tmp_path, capsys
):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    line = one_error(capsys, main(train_argv(tiny_phi3_tok, run, 4)))
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    # a resumed run that fails at start-up (another dataset: refused) leaves the old run as it was
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    argv = train_argv(tiny_phi3_tok, run, 4, "--resume", "auto", "--dataset", str(bad))
    line = one_error(capsys, main(argv))
    assert "settings differ" in line and f"--dataset None → {str(bad)!r}" in line
    assert snapshot(run) == before


def test_overwrite_replaces_the_previous_run(finished_run, tiny_phi3_tok, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    assert main(train_argv(tiny_phi3_tok, run, 3, "--overwrite", "--save-steps", "3")) == 0
    assert "removed the previous run" in capsys.readouterr().err
    names = sorted(p.name for p in run.iterdir())
    assert "step_2" not in names and "step_3" in names and "notes.txt" in names
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_two_runs_in_one_folder_at_once(tiny_phi3_tok, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen(
        cli_cmd(
            "train",
            base_model=tiny_phi3_tok,
            output_dir=run,
            max_steps=100_000,
            quantization="none",
            max_length=32,
            save_steps=100_000,
            progress=False,
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        line = one_error(capsys, main(train_argv(tiny_phi3_tok, run, 2, "--resume", "auto")))
        assert f"in use by another `agiasi train` (pid {first.pid})" in line
    finally:
        first.kill()
        first.wait()
    assert not any(p.name.startswith("step_") for p in run.iterdir())
    # the killed holder's lock does not block the folder (the OS released it)
    assert main(train_argv(tiny_phi3_tok, run, 2, "--resume", "auto")) == 0


def test_a_failed_start_leaves_no_empty_folder(tiny_phi3_tok, tmp_path, capsys):
    run = tmp_path / "new_run"
    one_error(capsys, main(train_argv(tiny_phi3_tok, run, 2, "--dataset", str(tmp_path / "x"))))
    assert not run.exists()


def test_resume_past_max_steps_says_so(finished_run, tiny_phi3_tok, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    line = one_error(capsys, main(train_argv(tiny_phi3_tok, run, 1, "--resume", "auto")))
    assert "is at step 2, past --max-steps 1" in line
    assert main(train_argv(tiny_phi3_tok, run, 2, "--resume", "auto")) == 0
    assert "already at --max-steps 2; nothing to train" in capsys.readouterr().err
    assert snapshot(run) == before


def _all_finite(folder) -> bool:
    tensors = list(load_file(folder / "adapter_model.safetensors").values())
    soul = torch.load(folder / "soul.pt", weights_only=True)
    tensors += [soul["alpha"], *soul["so8_rotation"].values()]
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    for s in state["optimizer"]["state"].values():
        tensors += [v for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_a_diverging_run_never_writes_or_names_a_poisoned_folder(tmp_path, capsys):
    """The issue's case: the shipped model in NF4 at a learning rate of 1e8. Its loss stays
    finite one step longer than its weights (step 2's update makes them nan), so checking only
    the loss saved step_2 poisoned and called it the last good one."""
    from agiasi.demo import tiny_model_path

    run = tmp_path / "run"
    args = cli_args("train", base_model=tiny_model_path(), output_dir=run, max_steps=6)
    rc = main([*args, "--save-steps", "1", "--learning-rate", "1e8", "--max-length", "64",
               "--no-progress"])  # fmt: skip
    assert rc == 2
    line = last_error(capsys)
    assert "non-finite (nan/inf)" in line and "Last good checkpoint:" in line
    folders = sorted(p for p in run.iterdir() if p.name.startswith("step_"))
    for f in folders:
        assert _all_finite(f), f"{f.name} holds nan/inf"
    named = line.split("Last good checkpoint: ")[1].split(". ")[0]
    if folders:
        assert named == str(folders[-1])
    else:
        assert named == "none yet"


CHANGED = {
    "lora_alpha": (("--lora-alpha", "64"), "--lora-alpha 32 → 64"),
    "soul_mix": (("--soul-mix", "residual"), "--soul-mix 'convex' → 'residual'"),
    "seed": (("--seed", "7"), "--seed 42 → 7"),
    "max_length": (("--max-length", "48"), "--max-length 32 → 48"),
    "quantization": (("--quantization", "nf4"), "--quantization 'none' → 'nf4'"),
    "batch_size": (("--batch-size", "2"), "--batch-size 1 → 2"),
    "no_soul": (("--no-soul",), "--soul True → False"),
}


@pytest.mark.parametrize("case", CHANGED)
def test_resume_refuses_changed_settings_with_what_differs(finished, tiny_phi3_tok, capsys, case):
    flags, shown = CHANGED[case]
    before = (finished / "train_config.json").read_text()
    assert train(tiny_phi3_tok, finished, 4, "--resume", "auto", *flags) == 2
    line = last_error(capsys)
    assert "settings differ from the checkpoint's" in line and shown in line, line
    assert (finished / "train_config.json").read_text() == before  # nothing rewritten
    assert not (finished / "step_4").exists()


def test_resume_may_change_length_and_cadence(finished, tiny_phi3_tok, tmp_path):

    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    assert train(tiny_phi3_tok, run, 4, "--resume", "auto", save=1) == 0
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 4
    assert {p.name for p in run.iterdir() if p.name.startswith("step_")} == {
        "step_2",
        "step_3",
        "step_4",
    }


def test_resume_into_a_folder_of_another_run_is_refused(finished, tiny_phi3_tok, tmp_path, capsys):
    other = tmp_path / "other"
    assert train(tiny_phi3_tok, other, 2) == 0
    before = {p.name: p.stat().st_mtime_ns for p in other.rglob("*")}
    capsys.readouterr()
    rc = train(tiny_phi3_tok, other, 4, "--resume", str(finished / "step_2"))
    assert rc == 2
    line = last_error(capsys)
    assert f"--output-dir {other} holds another run" in line
    assert {p.name: p.stat().st_mtime_ns for p in other.rglob("*")} == before
    # into a new folder the checkpoint's run goes on, under its own identity
    new = tmp_path / "new"
    assert train(tiny_phi3_tok, new, 3, "--resume", str(finished / "step_2")) == 0
    run_id = json.loads((finished / "run.json").read_text())["run_id"]
    assert json.loads((new / "run.json").read_text())["run_id"] == run_id
    state = torch.load(new / "step_3" / "trainer_state.pt", weights_only=True)
    assert state["run_id"] == run_id
    # and a later --resume auto there continues that run, not a foreign one
    assert train(tiny_phi3_tok, new, 4, "--resume", "auto") == 0


def test_sigterm_stops_training_cleanly(tiny_phi3_tok, tmp_path):
    import signal
    import subprocess
    import time

    from tests.helpers import cli_cmd

    run = tmp_path / "run"
    proc = subprocess.Popen(
        cli_cmd("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=100_000,
                save_steps=100_000, quantization="none", max_length=32, progress=False),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "agiasi: terminated"
    left = sorted(p.name for p in run.iterdir())
    assert ".agiasi-train.lock" not in left and ".agiasi-train.pid" not in left
    assert not [n for n in left if ".tmp-" in n]


def test_disk_full_anywhere_is_one_line(tiny_phi3_tok, tmp_path, capsys, monkeypatch):
    import agiasi.train.loop as train_mod

    real = train_mod.log_step

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(train_mod, "log_step", full)
    assert train(tiny_phi3_tok, tmp_path / "run", 2) == 2
    line = last_error(capsys)
    assert "the disk is full writing" in line and "metrics.jsonl" in line
    monkeypatch.setattr(train_mod, "log_step", real)
    assert not (tmp_path / "run" / ".agiasi-train.lock").exists()


def test_ctrl_c_saves_the_step_in_flight_and_resume_continues(tiny_phi3_tok, tmp_path):
    """The first SIGINT (Ctrl-C, the studio's Stop) finishes the step in flight, saves it as a
    step folder and exits 130 with ``status.json`` "stopped"; ``--resume auto`` continues from
    that step to the end, and the status then says "finished"."""
    import signal

    run = tmp_path / "run"
    flags = dict(base_model=tiny_phi3_tok, output_dir=run, max_steps=100_000, save_steps=100_000,
                 quantization="none", max_length=32, progress=False)  # fmt: skip
    proc = subprocess.Popen(cli_cmd("train", **flags), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            m = run / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "running" and status["pid"] == proc.pid
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    steps = [int(p.name[5:]) for p in run.iterdir() if p.name.startswith("step_")]
    assert len(steps) == 1 and steps[0] >= 3
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps[0]  # the saved step is the last one logged
    assert f"stopped at step {steps[0]}" in err and "--resume auto continues" in err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == steps[0]
    flags["max_steps"] = steps[0] + 2
    rc = main([*cli_args("train", **flags), "--resume", "auto"])
    assert rc == 0 and (run / f"step_{steps[0] + 2}").is_dir()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
