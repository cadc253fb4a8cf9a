"""`agiasi train` on a tiny Phi-3 with a Japanese tokenizer: files, schedule, resume, DDP, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agiasi.cli import main
from agiasi.soul import PHI
from agiasi.train.schedule import linear_annealing
from tests.helpers import (
    CUDA_OOM,
    TRAINED_STEP_FILES,
    assert_same_training,
    cli_args,
    cli_cmd,
    step_tensors,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
FAST = ["--quantization", "none", "--max-length", "64", "--lora-dropout", "0", "--no-progress"]


def train_cli(model, run, steps: int, *extra: str, save: int | None = None) -> int:
    """``agiasi train`` on ``model`` into ``run`` for ``steps`` steps (saved every ``save``,
    default: at the end), with the FAST settings and any ``extra`` flags; returns the exit code."""
    args = cli_args("train", base_model=model, output_dir=run, max_steps=steps)
    return main([*args, "--save-steps", str(save or steps), *FAST, *extra])


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_twelve_steps_write_exactly_the_expected_files(tiny_phi3_tok, tmp_path):
    run = tmp_path / "run"
    rc = train_cli(tiny_phi3_tok, run, 12, "--warmup-steps", "2", "--annealing-steps", "6", save=4)
    assert rc == 0
    assert sorted(os.listdir(run)) == [
        "metrics.jsonl",
        "phase_transition.png",
        "run.json",
        "status.json",
        "step_12",
        "step_4",
        "step_8",
        "train_config.json",
    ]
    for step in (4, 8, 12):
        folder = run / f"step_{step}"
        assert sorted(os.listdir(folder)) == TRAINED_STEP_FILES
        soul = torch.load(folder / "soul.pt", weights_only=True)
        assert soul["step"] == step
        # α in the checkpoint is the one used at the last step taken (0-based index step-1)
        assert soul["alpha"].item() == pytest.approx(linear_annealing(step - 1, 2, 6), abs=1e-6)
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        assert state["step"] == step and state["data_position"] == step
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    # α follows the schedule exactly at every step
    for r in rows:
        assert r["alpha"] == pytest.approx(
            linear_annealing(r["step"] - 1, 2, 6, -5.0, PHI), abs=1e-6
        )
    assert rows[0]["phase"] == "🔵 Stable" and rows[-1]["phase"] == "🟢 Golden Ratio Reached"
    assert (run / "phase_transition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_goes_down_over_60_steps(tiny_phi3_tok, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(
        "\n\n".join(
            [
                "日本語の文章を学習します。",
                "パッケージを作成する方法を説明します。",
                "このコマンドはファイルを表示します。",
            ]
            * 20
        )
        + "\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    assert (
        train_cli(
            tiny_phi3_tok,
            run,
            60,
            "--dataset",
            str(text),
            "--warmup-steps",
            "10",
            "--annealing-steps",
            "40",
            "--learning-rate",
            "5e-3",
            "--batch-size",
            "2",
        )
        == 0
    )
    losses = [r["task_loss"] for r in metrics(run)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.25, (first, last)


def test_learned_alpha_is_optimized(tiny_phi3_tok, tmp_path):
    run = tmp_path / "run"
    assert (
        train_cli(
            tiny_phi3_tok,
            run,
            5,
            "--alpha-mode",
            "learned",
            "--alpha-start",
            "0.5",
            "--learning-rate",
            "1e-2",
            "--soul-mix",
            "residual",
            "--lr-warmup-ratio",  # a warm-up's first step has rate 0: α would not move in it
            "0",
        )
        == 0
    )
    alphas = [r["alpha"] for r in metrics(run)]
    assert alphas[0] != pytest.approx(0.5, abs=1e-7) and len(set(alphas)) == 5
    state = torch.load(run / "step_5" / "trainer_state.pt", weights_only=True)
    # α is one of the optimizer's parameters (a scalar with Adam moments)
    assert any(s["exp_avg"].ndim == 0 for s in state["optimizer"]["state"].values())
    # convex mix: at R = I the output does not depend on α (its gradient is exactly 0), so α
    # first moves once the rotation has
    run = tmp_path / "convex"
    args = ("--alpha-mode", "learned", "--alpha-start", "0.5", "--learning-rate", "1e-2")
    args += ("--lr-warmup-ratio", "0")
    assert train_cli(tiny_phi3_tok, run, 5, *args) == 0
    rows = metrics(run)
    assert rows[0]["alpha"] == pytest.approx(0.5, abs=1e-7) and rows[0]["rotation_distance"] > 0
    assert rows[-1]["alpha"] != pytest.approx(0.5, abs=1e-5)


def test_control_run_without_soul(tiny_phi3_tok, tmp_path):
    run = tmp_path / "run"
    assert train_cli(tiny_phi3_tok, run, 3, "--no-soul") == 0
    folder = run / "step_3"
    assert not (folder / "soul.pt").exists()
    assert json.loads((folder / "soul.json").read_text())["soul"] is None
    assert metrics(run)[0]["alpha"] is None


def test_offload_embeddings_on_the_cpu_says_it_does_nothing(tiny_phi3_tok, tmp_path, capsys):
    """The flag is for GPU runs (tests/gpu/test_cuda.py runs it there); a CPU run trains as
    without it and says so, instead of silently ignoring what the user asked for."""
    assert train_cli(tiny_phi3_tok, tmp_path / "run", 2, "--offload-embeddings") == 0
    assert "--offload-embeddings: a CPU run keeps the embedding" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert cfg["offload_embeddings"] is True


def test_config_file_maps_to_flags_and_flags_win(tiny_phi3_tok, tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base-model: {tiny_phi3_tok}\nmax_steps: 3\nsave-steps: 100\nlora-r: 4\n"
        f"output-dir: {run}\nquantization: none\nmax-length: 32\nprogress: false\n"
    )
    assert main(["train", "--config", str(cfg), "--lora-r", "8"]) == 0
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["max_steps"] == 3 and saved["lora_r"] == 8 and saved["max_length"] == 32
    assert json.loads((run / "step_3" / "adapter_config.json").read_text())["r"] == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("max-stepz: 3\n")
    assert main(["train", "--config", str(bad)]) == 2


def _train_cmd(model, run, steps, extra=()):
    return cli_cmd(
        "train",
        *extra,
        base_model=model,
        output_dir=run,
        max_steps=steps,
        save_steps=5,
        warmup_steps=5,
        annealing_steps=20,
        seed=7,
        lora_dropout=0.1,
        quantization="none",
        max_length=48,
        progress=False,
    )


def test_sigkill_then_resume_auto_is_bit_exact(tiny_phi3_tok, tmp_path):
    steps = 40
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(tiny_phi3_tok, ref, steps), check=True, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(tiny_phi3_tok, run, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (run / "step_15").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / f"step_{steps}").exists(), "the run finished before it was killed"
    out = subprocess.run(
        _train_cmd(tiny_phi3_tok, run, steps, ["--resume", "auto"]), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "resume: from" in out.stderr
    a, b = step_tensors(ref / f"step_{steps}"), step_tensors(run / f"step_{steps}")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # metrics have one line per step, no duplicates from the killed part
    assert [r["step"] for r in metrics(run)] == list(range(1, steps + 1))


def test_resume_auto_skips_incomplete_folder(tiny_phi3_tok, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(tiny_phi3_tok, run, 4, save=2) == 0
    (run / "step_4" / "trainer_state.pt").unlink()  # as if damaged
    capsys.readouterr()
    assert train_cli(tiny_phi3_tok, run, 4, "--resume", "auto", save=2) == 0
    err = capsys.readouterr().err
    assert "skipping step_4: incomplete (missing trainer_state.pt)" in err
    assert "resume: from" in err and "step_2" in err


@pytest.mark.parametrize(
    "content, flags, message",
    [
        ('{"text": "日本語"}\n{"text": broken\n', [], "line 2 is not valid JSON"),
        ("", [], "the dataset is empty"),
        ('{"messages": [{"role": "user", "content": "こんにちは"}]}\n', [], "no assistant turn"),
        (
            '{"text": "日本語の文章です。"}\n',
            ["--max-length", "0"],
            "--max-length must be at least 2",
        ),
        (
            '{"text": "日本語の文章です。"}\n',
            ["--max-steps", "0"],
            "--max-steps must be at least 1",
        ),
        (
            '{"text": "日本語の文章です。"}\n',
            ["--learning-rate", "-1"],
            "--learning-rate must be positive",
        ),
    ],
)
def test_bad_input_gives_one_clear_error(tiny_phi3_tok, tmp_path, capsys, content, flags, message):
    data = tmp_path / "d.jsonl"
    data.write_text(content, encoding="utf-8")
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--base-model",
            str(tiny_phi3_tok),
            "--dataset",
            str(data),
            "--output-dir",
            str(run),
            "--max-steps",
            "2",
            "--quantization",
            "none",
            "--no-progress",
            "--max-length",
            "32",
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and "Traceback" not in err
    assert not any(p.name.startswith("step_") for p in run.glob("*"))


def test_checkpoint_from_another_base_is_refused(tiny_phi3_tok, tmp_path, capsys):
    from tests.helpers import build_tiny_phi3_with_tokenizer

    run = tmp_path / "run"
    assert train_cli(tiny_phi3_tok, run, 2) == 0
    other = build_tiny_phi3_with_tokenizer(tmp_path / "other", hidden=32)
    capsys.readouterr()
    rc = train_cli(other, tmp_path / "run2", 4, "--resume", str(run / "step_2"))
    assert rc == 2
    assert "trained on another base model" in capsys.readouterr().err


def test_nan_loss_stops_with_last_good_checkpoint_intact(tiny_phi3_tok, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(tiny_phi3_tok, run, 2) == 0
    before = step_tensors(run / "step_2")
    capsys.readouterr()
    rc = train_cli(
        tiny_phi3_tok,
        run,
        30,
        "--resume",
        "auto",
        "--learning-rate",
        "1e30",
        "--max-grad-norm",
        "0",
        save=1000,
    )
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite" in err and "step_2" in err
    after = step_tensors(run / "step_2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in run.glob("step_*")) == ["step_2"]


def test_gpu_out_of_memory_in_a_step_says_what_to_change(
    tiny_phi3_tok, tmp_path, capsys, monkeypatch
):
    """The third step runs out of GPU memory (raised as the allocator raises it): one line says
    what was asked, this run's own ways to need less (checkpointing is on, so the next rung is
    offloading; an untied head can leave the embedding on the host; these tests' bf16/fp32 base
    can be NF4; half the batch at twice the accumulation) and the last complete checkpoint, which stays as it was."""
    import agiasi.train.loop

    real, calls = agiasi.train.loop.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(*args, **kwargs)

    monkeypatch.setattr(agiasi.train.loop, "train_step", step)
    run = tmp_path / "run"
    assert train_cli(tiny_phi3_tok, run, 4, "--batch-size", "4", "--grad-accum", "2", save=2) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert (
        "agiasi: error: the GPU ran out of memory (it asked for 1.50 GiB more, 10.75 GiB in use). "
        "To need less: --offload-activations; --offload-embeddings; --quantization nf4; --batch-size "
        "2 --grad-accum 4 (about the same tokens a step); a shorter --max-length (now 64). Last complete "
        f"checkpoint: {run / 'step_2'} (--resume auto continues from it)."
    ) in err
    assert sorted(p.name for p in run.glob("step_*")) == ["step_2"]


def test_gpu_out_of_memory_while_loading_offers_only_what_is_off(
    tiny_phi3_tok, tmp_path, capsys, monkeypatch
):
    """Out of memory before the first step (here: building the model), with offloading on and
    one sequence a batch: nothing on is offered again, and there is no checkpoint to name."""
    import agiasi.train.session

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(agiasi.train.session, "AGIASI_SO8T_Wrapper", no_room)
    rc = train_cli(tiny_phi3_tok, tmp_path / "run", 2, "--offload-activations")
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        "agiasi: error: the GPU ran out of memory (it asked for 1.50 GiB more, 10.75 GiB in use). "
        "To need less: --quantization nf4; a shorter --max-length (now 64).\n"
    ) in err


def test_chat_jsonl_trains_only_on_assistant_tokens(tiny_phi3_tok):
    from transformers import AutoTokenizer

    from agiasi.data import IGNORE, tokenize_records

    tok = AutoTokenizer.from_pretrained(tiny_phi3_tok)
    rec = {
        "messages": [
            {"role": "user", "content": "こんにちは"},
            {"role": "assistant", "content": "はい、日本語です。"},
            {"role": "user", "content": "ありがとう"},
            {"role": "assistant", "content": "どういたしまして"},
        ]
    }
    (ex,) = tokenize_records([rec], tok, 256)
    learned = tok.decode([t for t in ex.labels if t != IGNORE])
    assert "はい、日本語です。" in learned and "どういたしまして" in learned
    assert "こんにちは" not in learned and "ありがとう" not in learned
    assert "<|user|>" not in learned


def test_note_command_line_runs(tiny_phi3_tok, tmp_path):
    run = tmp_path / "checkpoints_agiasi"
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/training/inject_soul_into_borea.py"),
            "--base-model",
            str(tiny_phi3_tok),
            "--max-steps",
            "3",
            "--warmup-steps",
            "1",
            "--annealing-steps",
            "1",
            "--batch-size",
            "1",
            "--max-length",
            "32",
            "--learning-rate",
            "2e-4",
            "--save-steps",
            "3",
            "--output-dir",
            str(run),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (run / "step_3" / "soul.pt").exists()


def _distributed_flags(model, steps: int) -> list[str]:
    """One run's flags, shared by the single process and the distributed launch."""
    return cli_args(
        "train",
        *FAST,
        base_model=model,
        max_steps=steps,
        save_steps=steps,
        warmup_steps=1,
        annealing_steps=steps // 2,
        batch_size=1,
        learning_rate=1e-3,
        device="cpu",
    )[1:]


@pytest.mark.parametrize("ranks", [2, 4])
def test_ddp_ranks_equal_one_rank_with_grad_accum(tiny_phi3_tok, tmp_path, ranks):
    """N gloo ranks × batch 1 == 1 rank × batch 1 × --grad-accum N (soul and adapter equal up to
    the order of fp32 sums: :data:`tests.helpers.SUM_ORDER_RTOL`),
    and the logged loss is the global batch's, so the curves match too."""
    from agiasi.shipped import default_heldout

    common = _distributed_flags(tiny_phi3_tok, steps=6)
    # validation too: split across the ranks, it must give one process's number
    common += ["--eval-dataset", str(default_heldout()), "--eval-max-tokens", "2000"]
    one = tmp_path / "one"
    assert main(["train", *common, "--output-dir", str(one), "--grad-accum", str(ranks)]) == 0
    many = tmp_path / "many"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--master-port",
            str(29533 + ranks),
            "-m",
            "agiasi",
            "train",
            *common,
            "--output-dir",
            str(many),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = step_tensors(one / "step_6"), step_tensors(many / "step_6")
    assert_same_training(a, b)
    la = [r["loss"] for r in metrics(one)]
    lb = [r["loss"] for r in metrics(many)]
    assert len(lb) == 6
    # the forward of the same weights: rounding only, relative to the loss itself
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(la, lb, strict=True)), (la, lb)
    ea, eb = metrics(one)[-1], metrics(many)[-1]
    assert ea["eval_tokens"] == eb["eval_tokens"] > 1500
    # the same weights (up to sum order) scored on the same tokens in other batches
    assert abs(ea["eval_loss"] - eb["eval_loss"]) <= 1e-5 * ea["eval_loss"]
    # only rank 0 wrote: one set of step folders, no stray files
    assert sorted(p.name for p in many.iterdir()) == sorted(p.name for p in one.iterdir())


def test_hf_dataset_folder_and_plot_command(tiny_phi3_tok, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hfds"
    datasets.Dataset.from_dict(
        {"text": ["日本語の文章です。", "もう一つの文書です。"] * 4}
    ).save_to_disk(str(folder))
    run = tmp_path / "run"
    assert train_cli(tiny_phi3_tok, run, 2, "--dataset", str(folder)) == 0
    (run / "phase_transition.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert (run / "phase_transition.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path)]) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_equals_one_process(tiny_phi3_tok, tmp_path):
    """``torchrun --nnodes 2`` with the c10d rendezvous: two agents (here on one host, as two
    machines would each start one) train exactly what one process with --grad-accum 2 does."""
    common = _distributed_flags(tiny_phi3_tok, steps=4)
    one = tmp_path / "one"
    assert main(["train", *common, "--output-dir", str(one), "--grad-accum", "2"]) == 0
    nodes = tmp_path / "nodes"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv-id",
        "agiasi-two-nodes",
        "-m",
        "agiasi",
        "train",
        *common,
        "--output-dir",
        str(nodes),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    try:
        outs = [a.communicate(timeout=600) for a in agents]
    finally:
        for a in agents:
            a.kill()
    for a, (_, err) in zip(agents, outs, strict=True):
        assert a.returncode == 0, err[-3000:]
    a, b = step_tensors(one / "step_4"), step_tensors(nodes / "step_4")
    assert_same_training(a, b)
    la = [r["loss"] for r in metrics(one)]
    lb = [r["loss"] for r in metrics(nodes)]
    # the forward of the same weights: rounding only, relative to the loss itself
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(la, lb, strict=True)), (la, lb)
    assert sorted(p.name for p in nodes.iterdir()) == sorted(p.name for p in one.iterdir())
