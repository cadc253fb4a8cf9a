"""``--report-to tensorboard,wandb,trackio,mlflow``: each tracker's files, read back with that
library's own reader (TensorBoard's event accumulator, W&B's record protobufs, Trackio's SQLite
storage, MLflow's client), hold the same values as ``metrics.jsonl``; a tracker that is not
installed is one line before any work; a resume continues the same MLflow and W&B run."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys

import pytest

from agiasi.cli import main
from agiasi.shipped import tiny_model_path
from tests.helpers import cli_cmd
from tests.reliability.common import one_error

pytestmark = pytest.mark.slow

for _pkg in ("tensorboard", "wandb", "trackio", "mlflow"):
    pytest.importorskip(_pkg)

KEYS = ("loss", "task_loss", "lr", "alpha", "gate", "rotation_distance", "grad_norm")


def metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """4 steps, validation, saves at 2 and 4, every tracker; then resumed to 6 steps."""
    run = tmp_path_factory.mktemp("report") / "run"
    flags = dict(base_model=tiny_model_path(), output_dir=run, max_steps=4, save_steps=2,
                 max_length=48, quantization="none", progress=False,
                 eval_dataset=__import__("agiasi.shipped").shipped.default_heldout(), eval_max_tokens=200,
                 report_to="tensorboard,wandb,trackio,mlflow")  # fmt: skip
    env = {"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    env.pop("WANDB_MODE", None)
    for steps, extra in ((4, []), (6, ["--resume", "auto"])):
        cmd = cli_cmd("train", **{**flags, "max_steps": steps}) + extra
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_tensorboard_holds_every_number(reported):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reported / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    rows = metrics(reported)
    for key in (*KEYS, "eval_loss"):
        want = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert all(
            abs(g - w) <= 1e-6 * max(1.0, abs(w)) for (_, g), (_, w) in zip(got, want, strict=True)
        ), key  # float32
    assert [e.step for e in acc.Images("phase_transition")] == [2, 4, 6]
    assert {"config/text_summary", "phase/text_summary"} <= set(acc.Tags()["tensors"])
    phases = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("phase/text_summary")]
    assert phases == [r["phase"] for r in rows]


def _wandb_history(run) -> list[dict]:
    """W&B's offline run file: LevelDB-log blocks of its own ``Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        pos, records, part = 7, [], b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind == 1:
                records.append(chunk)
            elif kind == 2:
                part = chunk
            elif kind == 3:
                part += chunk
            elif kind == 4:
                records.append(part + chunk)
        for raw in records:
            rec = pb.Record.FromString(raw)
            if rec.WhichOneof("record_type") == "history":
                rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                             for it in rec.history.item})  # fmt: skip
    return rows


def test_wandb_offline_run_holds_every_number_and_resumes_the_same_run(reported):
    history = {int(h["_step"]): h for h in _wandb_history(reported)}
    rows = metrics(reported)
    assert sorted(history) == [r["step"] for r in rows]
    for r in rows:
        for key in (*KEYS, "phase"):
            assert history[r["step"]][key] == r[key], (r["step"], key)
    runs = {p.split("-")[-1] for p in glob.glob(str(reported / "wandb" / "offline-run-*"))}
    assert len(runs) == 1  # the resume continued the same W&B run id


def test_trackio_store_holds_every_number(reported):
    code = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps(S.get_logs('agiasi', 'run'), default=str))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "TRACKIO_DIR": str(reported / "trackio")})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    logs = {
        int(x["step"]): x for x in json.loads(out.stdout.strip().splitlines()[-1]) if "loss" in x
    }
    for r in metrics(reported):
        for key in KEYS:
            assert logs[r["step"]][key] == pytest.approx(r[key], rel=1e-12), (r["step"], key)


def test_mlflow_holds_every_number_the_config_and_one_run(reported):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{reported / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "agiasi"]
    (run,) = client.search_runs([exp.experiment_id])  # the resume reopened it
    assert run.data.params["max_steps"] == "4" and run.data.params["method"] == "sft"
    rows = metrics(reported)
    for key in (*KEYS, "eval_loss"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        want = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        assert hist == want, key
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert arts == ["plots/step_2", "plots/step_4", "plots/step_6"]


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    run = tmp_path / "run"
    args = ["train", "--base-model", str(tiny_model_path()), "--output-dir", str(run),
            "--report-to", "tensorboard,wandb"]  # fmt: skip
    line = one_error(capsys, main(args))
    assert "--report-to wandb needs the wandb package: pip install wandb" in line
    assert not run.exists()
    line = one_error(capsys, main([*args[:-1], "tensorbord"]))
    assert "'tensorbord' is not one of tensorboard, wandb, trackio, mlflow" in line


def test_a_dpo_run_reports_its_rewards(tmp_path):
    """``--method dpo --report-to tensorboard``: the preference figures (rewards, margin,
    accuracy, log-probs) reach TensorBoard under their metrics.jsonl names and values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"質問{i}：日本の首都は？", "chosen": "東京です。", "rejected": f"大阪{i}です。"}
            for i in range(8)]  # fmt: skip
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    run = tmp_path / "run"
    cmd = cli_cmd("train", base_model=tiny_model_path(), output_dir=run, method="dpo",
                  dataset=pairs, max_steps=3, save_steps=3, batch_size=2, max_length=48,
                  quantization="none", progress=False, learning_rate=1e-3,
                  report_to="tensorboard")  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    lines = metrics(run)
    for key in ("rewards/chosen", "rewards/rejected", "margin", "accuracy", "logps/chosen"):
        want = [(r["step"], r[key]) for r in lines]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [1, 2, 3], key
        assert all(abs(g - w) <= 1e-6 * max(1.0, abs(w))
                   for (_, g), (_, w) in zip(got, want, strict=True)), key  # fmt: skip
    assert lines[0]["rewards/chosen"] == 0 and lines[-1]["margin"] != 0  # it moved from the start
