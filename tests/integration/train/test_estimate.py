"""``agiasi estimate`` and ``agiasi train --dry-run`` / ``--max-memory`` as a user runs them:
the plan from config.json and the data's token counts without loading a weight, the same
figures as JSON, and the refusal before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agiasi.shipped import tiny_model_path

pytestmark = pytest.mark.slow


def agiasi(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "agiasi", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)  # fmt: skip


def test_estimate_prints_the_plan_and_the_json_holds_the_same(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "こんにちは" * k},
                          {"role": "assistant", "content": "はい"}]} for k in range(1, 41)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    args = ["estimate", "--base-model", str(tiny_model_path()), "--dataset", str(data),
            "--max-length", "512", "--batch-size", "4", "--max-steps", "30"]  # fmt: skip
    text = agiasi(*args)
    assert text.returncode == 0, text.stderr
    for part in ("weights", "adapter", "checkpoints", "layer", "head", "allocator", "CUDA context"):
        assert part in text.stdout
    js = agiasi(*args, "--json")
    assert js.returncode == 0, js.stderr
    e = json.loads(js.stdout.strip().splitlines()[-1])
    # the chat examples are shorter than --max-length: the longest micro-batch is the longest one
    assert e["data"]["longest"] < 512 and e["data"]["length"] == e["data"]["longest"]
    assert e["tokens_per_micro_batch"] == 4 * e["data"]["longest"]
    assert e["steps"] == 30 and e["trainable"] == 148352
    assert f"{e['card_gib']:.2f} GiB" in text.stdout
    assert (
        e["card_gib"]
        > e["reserved_gib"]
        > e["allocated_gib"]
        == pytest.approx(sum(e["gpu_gib"].values()), abs=0.01)
    )


def test_dry_run_stops_before_the_model_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = agiasi("train", "--base-model", str(tiny_model_path()), "--output-dir", str(out),
               "--dry-run", "--max-length", "64")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "predicted peak" in r.stdout and not out.exists()


def test_max_memory_refuses_before_any_work_naming_the_flags(tmp_path):
    out = tmp_path / "run"
    r = agiasi("train", "--base-model", str(tiny_model_path()), "--output-dir", str(out),
               "--max-memory", "0.01", "--batch-size", "2", "--max-length", "64")  # fmt: skip
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "above --max-memory 0.01 GiB" in line
    assert "--offload-activations" in line and "--batch-size 1 --grad-accum 2" in line
    assert "Traceback" not in r.stderr and not out.exists()
    # a limit above the estimate lets the run go
    ok = agiasi("train", "--base-model", str(tiny_model_path()), "--output-dir", str(out),
                "--max-memory", "4", "--max-steps", "1", "--max-length", "32", "--no-progress")  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (out / "step_1").is_dir()
