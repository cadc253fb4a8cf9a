"""Preference tuning end to end (``agiasi train --method dpo|orpo``): every preference shape in
every file kind it comes in trains; DPO's reference is the starting model exactly (soul and
adapter of an ``--init-from`` step folder); the precomputed reference trains as the online one;
a DPO run resumes bit for bit; bad pairs get one line, exit 2 and no step folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agiasi.cli import main
from tests.helpers import cli_args, write_records
from tests.integration.data.test_data_matrix import FLAT, NESTED
from tests.reliability.common import one_error

pytestmark = pytest.mark.slow

Q = ["日本の首都はどこですか", "富士山の高さは", "おすすめの本を教えて", "今日の天気は"]
GOOD = ["東京です。", "3776メートルです。", "吾輩は猫であるです。", "晴れです。"]
BAD = ["大阪です。", "知りません。", "ありません。", "雨かも。"]
TINY = ["--quantization", "none", "--max-length", "48", "--no-progress", "--batch-size", "2"]


def _user(q):
    return {"role": "user", "content": q}


def _bot(a):
    return {"role": "assistant", "content": a}


def pair_records(shape: str) -> list[dict]:
    rows = zip(Q, GOOD, BAD, strict=True)
    if shape == "explicit":
        return [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in rows]
    if shape == "explicit-conversational":
        return [{"prompt": [_user(q)], "chosen": [_bot(c)], "rejected": [_bot(r)]}
                for q, c, r in rows]  # fmt: skip
    if shape == "implicit":
        return [{"chosen": [_user(q), _bot(c)], "rejected": [_user(q), _bot(r)]}
                for q, c, r in rows]  # fmt: skip
    if shape == "alpaca-preference":
        return [{"instruction": q, "input": "", "chosen": c, "rejected": r} for q, c, r in rows]
    if shape == "sharegpt-preference":
        return [{"conversations": [{"from": "human", "value": q}],
                 "chosen": {"from": "gpt", "value": c}, "rejected": {"from": "gpt", "value": r}}
                for q, c, r in rows]  # fmt: skip
    raise AssertionError(shape)


COMBOS = [(s, k) for s in ("explicit", "alpaca-preference") for k in FLAT] + [
    (s, k) for s in ("explicit-conversational", "implicit", "sharegpt-preference") for k in NESTED
]


def rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text("utf-8").splitlines()]


@pytest.mark.parametrize(("shape", "kind"), COMBOS, ids=[f"{s}-{k}" for s, k in COMBOS])
def test_dpo_and_orpo_train_on_every_shape_and_kind(tiny_phi3_tok, tmp_path, shape, kind):
    path = write_records(pair_records(shape), kind, tmp_path / "data")
    for method in ("dpo", "orpo"):
        run = tmp_path / method
        args = cli_args(
            "train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=path
        )
        assert main([*args, *TINY, "--method", method, "--lr-warmup-steps", "0"]) == 0
        got = rows(run)
        assert [r["step"] for r in got] == [1, 2]
        for r in got:
            assert math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1
            assert {"rewards/chosen", "rewards/rejected", "margin", "logps/chosen"} <= set(r)
        if method == "dpo":  # step 1 scores the starting model: the policy is the reference
            assert got[0]["task_loss"] == pytest.approx(math.log(2), abs=1e-6)
            assert got[0]["margin"] == pytest.approx(0, abs=1e-6)
        else:
            assert "nll" in got[0] and "log_odds_ratio" in got[0]
        assert got[1]["task_loss"] != got[0]["task_loss"]  # it learnt something
        assert (run / "step_2" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def sft_step(tiny_phi3_tok, tmp_path_factory):
    """An SFT run whose α has moved (the gate open) and whose rotation is off the identity."""
    run = tmp_path_factory.mktemp("sft") / "run"
    args = cli_args("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=3)
    flags = ["--warmup-steps", "0", "--annealing-steps", "2", "--learning-rate", "5e-3"]
    assert main([*args, *TINY, *flags, "--quantization", "nf4"]) == 0
    soul = json.loads((run / "step_3" / "soul.json").read_text("utf-8"))
    assert soul["soul"]["alpha"] > 1.0
    return run / "step_3"


@pytest.fixture()
def pairs_file(tmp_path):
    return write_records(pair_records("explicit"), "jsonl", tmp_path / "pairs")


def test_reference_is_the_starting_step_folder_exactly(tiny_phi3_tok, sft_step, pairs_file):
    """The frozen copy (second adapter + soul copy on the one NF4 base) scores every pair
    exactly as the step folder's own model does, after the policy has moved."""
    from transformers import AutoTokenizer

    from agiasi.checkpoint.step_folder import load_into
    from agiasi.data import collate_pairs, load_pairs
    from agiasi.model.wrapper import AGIASI_SO8T_Wrapper
    from agiasi.train.reference import Reference

    tok = AutoTokenizer.from_pretrained(str(tiny_phi3_tok))
    data = load_pairs(pairs_file, tok, 48)
    batch = collate_pairs(data.train, tok.pad_token_id)
    start = AGIASI_SO8T_Wrapper.from_checkpoint(sft_step, device="cpu")
    start.eval()
    with torch.no_grad():
        want, _, _ = start.sequence_logps(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
    policy = AGIASI_SO8T_Wrapper.from_checkpoint(sft_step, device="cpu", lora_dropout=0.0)
    load_into(policy, sft_step)
    ref = Reference(policy, adapter_trained=True)
    with torch.no_grad():  # the policy moves: adapter, rotation and α
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.01)
        policy.soul.alpha.add_(0.3)
    policy.train()
    got_c, got_r = ref.score(policy, batch)
    assert torch.equal(torch.cat([got_c, got_r]), want)
    moved, _, _ = policy.sequence_logps(
        batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    assert not torch.allclose(moved, want)  # and the policy is not the reference


def test_dpo_from_an_sft_step_starts_at_the_reference_and_keeps_alpha(
    tiny_phi3_tok, sft_step, pairs_file, tmp_path, capsys
):
    run = tmp_path / "dpo"
    args = cli_args(
        "train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=pairs_file
    )
    assert main([*args, *TINY, "--method", "dpo", "--init-from", str(sft_step)]) == 0
    err = capsys.readouterr().err
    alpha = json.loads((sft_step / "soul.json").read_text("utf-8"))["soul"]["alpha"]
    assert f"alpha stays at {alpha:.4f}" in err
    got = rows(run)
    assert got[0]["task_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert all(r["alpha"] == pytest.approx(alpha) for r in got)
    cfg = json.loads((run / "train_config.json").read_text("utf-8"))
    assert cfg["quantization"] == "none" and cfg["init_from"] == str(sft_step)


def test_precomputed_reference_trains_as_the_online_one(
    tiny_phi3_tok, sft_step, pairs_file, tmp_path
):
    """Same losses step by step (to float32 rounding of differently padded batches) and the
    table kept in the run folder."""
    out = {}
    for name, extra in (("online", []), ("precomputed", ["--precompute-reference"])):
        run = tmp_path / name
        args = cli_args(
            "train", base_model=tiny_phi3_tok, output_dir=run, max_steps=3, dataset=pairs_file
        )
        flags = [*TINY, "--method", "dpo", "--init-from", str(sft_step), "--eval-split", "0.25"]
        assert main([*args, *flags, *extra]) == 0
        out[name] = rows(run)
    assert (tmp_path / "precomputed" / "reference_logps.safetensors").is_file()
    assert not (tmp_path / "online" / "reference_logps.safetensors").exists()
    for a, b in zip(out["online"], out["precomputed"], strict=True):
        for k in ("task_loss", "margin", "rewards/chosen", "rewards/rejected", "eval_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a["step"])


@pytest.mark.parametrize("precompute", [False, True], ids=["online", "precomputed"])
def test_dpo_resume_is_exact(tiny_phi3_tok, sft_step, pairs_file, tmp_path, capsys, precompute):
    from safetensors.torch import load_file

    extra = ["--precompute-reference"] if precompute else []
    flags = [*TINY, "--method", "dpo", "--init-from", str(sft_step), "--lr-warmup-steps", "0",
             "--save-steps", "2", "--dataset", pairs_file, *extra]  # fmt: skip

    def go(run, steps, *more):
        args = cli_args("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=steps)
        assert main([*args, *flags, *more]) == 0

    go(tmp_path / "whole", 4)
    go(tmp_path / "parts", 2)
    capsys.readouterr()
    go(tmp_path / "parts", 4, "--resume", "auto")
    err = capsys.readouterr().err
    if precompute:
        assert "read back from the run folder" in err and "scored" not in err
    a = load_file(str(tmp_path / "whole" / "step_4" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "step_4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole, parts = rows(tmp_path / "whole"), rows(tmp_path / "parts")
    assert [r["loss"] for r in whole] == [r["loss"] for r in parts]


BAD_CASES = {
    "chosen equals rejected": (
        [{"prompt": "a", "chosen": "同じ", "rejected": "同じ"}],
        [],
        "the chosen and the rejected answer are the same",
    ),
    "a missing field": (
        [{"prompt": "a", "chosen": "はい"}],
        [],
        "is not a preference pair",
    ),
    "implicit prompt not a prefix": (
        [{"chosen": [_user("一"), _bot("x")], "rejected": [_user("二"), _bot("y")]}],
        [],
        "the prompt is not a prefix of both",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_pairs_one_line_exit_2_nothing_written(tiny_phi3_tok, tmp_path, capsys, case):
    recs, extra, message = BAD_CASES[case]
    path = write_records(recs, "jsonl", tmp_path / "data")
    run = tmp_path / "run"
    args = cli_args("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=path)
    line = one_error(capsys, main([*args, *TINY, "--method", "dpo", *extra]))
    assert message in line and "d.jsonl" in line
    assert not run.exists() or not any(
        p.name.startswith(("step_", "metrics")) for p in run.iterdir()
    )


def test_a_pair_far_longer_than_max_length_keeps_answer_tokens(tiny_phi3_tok, tmp_path):
    """Prompt first, then the answers' ends, and one prompt token always kept: every side of
    every pair keeps scored answer tokens, so "no answer token left" cannot happen for any
    --max-length ≥ 2 (the flag's bound); the run trains and scores both sides."""
    recs = [{"prompt": "長い質問です。" * 100, "chosen": "はい、" * 40, "rejected": "いいえ"}] * 2
    path = write_records(recs, "jsonl", tmp_path / "data")
    run = tmp_path / "run"
    args = cli_args("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=path)
    tiny = [x if x != "48" else "4" for x in TINY]
    assert main([*args, *tiny, "--method", "dpo"]) == 0
    assert all(math.isfinite(r["logps/chosen"]) and r["logps/chosen"] < 0 for r in rows(run))


def test_dpo_on_plain_text_says_what_to_do(tiny_phi3_tok, tmp_path, capsys):
    p = tmp_path / "t.txt"
    p.write_text("吾輩は猫である。\n\n名前はまだ無い。\n", encoding="utf-8")
    run = tmp_path / "run"
    args = cli_args("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=p)
    line = one_error(capsys, main([*args, *TINY, "--method", "dpo"]))
    assert "trains on preference pairs" in line and "plain text" in line and "--method sft" in line
    assert not run.exists() or not any(p.name.startswith("step_") for p in run.iterdir())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "dpo", "--packing"], "leave --packing off"),
        (["--method", "orpo", "--precompute-reference"], "is for --method dpo"),
        (["--dataset-format", "preference"], "train on them with --method dpo"),
        (["--method", "dpo", "--dataset-format", "alpaca"], "use auto or one of"),
        (["--method", "dpo", "--init-from", "/nonexistent/step_3"], "--init-from"),
    ],
)
def test_flag_combinations_refused(tiny_phi3_tok, tmp_path, capsys, pairs_file, flags, message):
    run = tmp_path / "run"
    args = cli_args(
        "train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=pairs_file
    )
    line = one_error(capsys, main([*args, *TINY, *flags]))
    assert message in line


def test_dpo_on_two_ranks_equals_one_rank_with_grad_accum(
    tiny_phi3_tok, sft_step, pairs_file, tmp_path
):
    """Two gloo ranks × 1 pair == one process × --grad-accum 2: the same adapter and soul up to
    the order of fp32 sums, the reference built on every rank; rank 0 alone writes."""
    import os
    import subprocess
    import sys

    from tests.helpers import assert_same_training, step_tensors

    common = [*cli_args("train", base_model=tiny_phi3_tok, max_steps=3, dataset=pairs_file),
              "--quantization", "none", "--max-length", "48", "--no-progress", "--batch-size", "1",
              "--method", "dpo", "--init-from", str(sft_step), "--device", "cpu",
              "--learning-rate", "1e-3"]  # fmt: skip
    one = tmp_path / "one"
    assert main([*common, "--output-dir", str(one), "--grad-accum", "2"]) == 0
    many = tmp_path / "many"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29571", "-m", "agiasi", *common, "--output-dir", str(many)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_training(step_tensors(one / "step_3"), step_tensors(many / "step_3"))
    la, lb = rows(one), rows(many)
    for a, b in zip(la, lb, strict=True):
        for k in ("loss", "margin", "accuracy"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(abs(a[k]), 1.0), (k, a, b)
    assert sorted(p.name for p in many.iterdir()) == sorted(p.name for p in one.iterdir())


@pytest.mark.llamacpp
def test_a_dpo_step_exports_with_the_soul_folded(tiny_phi3_tok, sft_step, pairs_file, tmp_path):
    """A DPO step folder is a step folder: the export folds its soul exactly (the fidelity
    report's wrapper-vs-HF row) and llama.cpp runs its GGUF like the HF model."""
    run = tmp_path / "dpo"
    args = cli_args(
        "train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=pairs_file
    )
    assert main([*args, *TINY, "--method", "dpo", "--init-from", str(sft_step)]) == 0
    out = tmp_path / "out"
    assert main(["export", str(run / "step_2"), "--out", str(out), "--gguf", "f32"]) == 0
    report = json.loads((out / "export_report.json").read_text("utf-8"))
    p = report["parity"]
    assert p["wrapper_fp32 vs hf"]["max_abs_dlogit"] <= 1e-4
    assert p["gguf f32 vs hf"]["greedy_equal"] and p["gguf f32 vs hf"]["rel_dlogit"] <= 1e-3
