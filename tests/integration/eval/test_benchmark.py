"""`agiasi eval --task`: log-likelihoods equal to a hand computation (HF model and soul wrapper),
GGUF = HF item by item, `--compare` on identical models, lm-evaluation-harness on the same
items, and the export's benchmark rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agiasi.cli import main
from agiasi.eval.benchmark import score_set
from agiasi.eval.loglik import encode_pair
from agiasi.eval.models import open_eval_model
from agiasi.eval.tasks import TASKS, continuations, plain_prompt, prepare
from agiasi.shipped import tiny_model_path
from tests.helpers import make_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

# fp32 log-likelihoods of a few tokens: the packed row (one context, every choice after it under
# a 4-D mask) and one sequence per choice differ only in reduction order and kernel choice,
# ~1e-7 of the magnitude per operation through a few layers (seen: 1e-6 on AVX512 and AVX2).
# 1e-4 of the magnitude is ~1000 float32 ulps; a wrong mask or position moves a choice's
# log-likelihood by whole nats.
LOGLIK_RTOL = 1e-4


def _by_hand(model_logits, encode, context: str, choice: str) -> float:
    """Σ log p(choice tokens | context) from one full sequence, lm-eval's token split."""
    ctx = encode(context)
    cont = encode(context + choice)[len(ctx) :]
    logits = model_logits(ctx + cont).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LOGLIK_RTOL * max(1.0, abs(b))


def test_loglik_equals_the_hand_computation_hf_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path()
    report = tmp_path / "r.json"
    args = ["eval", str(path), "--task", "jcommonsenseqa,jnli", "--limit", "3"]
    assert main(args + ["--report", str(report), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "jcommonsenseqa: 3 items, 0-shot, plain prompt" in out
    got = json.loads(report.read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def logits(ids):
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].numpy()

    def encode(text):
        return tok(text)["input_ids"]

    for name in ("jcommonsenseqa", "jnli"):
        ts = prepare(TASKS[name], limit=3)
        res = got["tasks"][name]["results"][0]
        for item, rec in zip(ts.items, res["per_item"], strict=True):
            ctx = plain_prompt(ts.task, item, [])
            assert rec["context"] == ctx
            want = [_by_hand(logits, encode, ctx, c) for c in continuations(ts.task, item, False)]
            assert all(_close(a, b) for a, b in zip(rec["logliks"], want, strict=True)), (
                rec["logliks"],
                want,
            )
            assert rec["pred"] == int(np.argmax(want))
            lens = np.array([len(c) for c in ts.task.choices(item)])
            assert rec["pred_norm"] == int(np.argmax(np.array(want) / lens))
        acc = np.mean([r["pred"] == r["gold"] for r in res["per_item"]])
        assert res["acc"] == pytest.approx(acc)


def test_loglik_through_the_soul_wrapper_and_batching_changes_nothing(tiny_phi3_tok, tmp_path):
    """A step folder scores through the wrapper (LoRA + a rotated soul): equal to the wrapper's
    own full-sequence logits, and 8 items in one batch equal the same items one by one."""
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    model = open_eval_model(ckpt, device="cpu")
    assert model.kind == "checkpoint"
    ts = prepare(TASKS["jcommonsenseqa"], limit=8)
    batched = score_set(model, ts, chat=False)
    model.scorer.batch_tokens = 1  # one item per forward
    single = score_set(model, ts, chat=False)
    for a, b in zip(batched["per_item"], single["per_item"], strict=True):
        assert all(_close(x, y) for x, y in zip(a["logliks"], b["logliks"], strict=True))
    for item, rec in zip(ts.items[:3], batched["per_item"][:3], strict=True):
        want = [
            _by_hand(model.logits, model.encode, rec["context"], c)
            for c in continuations(ts.task, item, False)
        ]
        assert all(_close(a, b) for a, b in zip(rec["logliks"], want, strict=True))


def test_gguf_and_hf_of_the_f32_export_agree_item_by_item(tmp_path):
    from agiasi.gguf.writer import write_gguf

    gguf = write_gguf(tiny_model_path(), tmp_path / "tiny-f32.gguf", "f32")
    hf = open_eval_model(tiny_model_path(), device="cpu")
    gg = open_eval_model(gguf)
    try:
        for name in ("jcommonsenseqa", "jnli"):
            ts = prepare(TASKS[name], limit=40)
            a, b = score_set(hf, ts, chat=False), score_set(gg, ts, chat=False)
            for item, x, y in zip(ts.items, a["per_item"], b["per_item"], strict=True):
                assert x["context"] == y["context"]
                span = float(np.ptp(hf.logits(hf.encode(x["context"]))))
                for c, p, q in zip(
                    continuations(ts.task, item, False), x["logliks"], y["logliks"], strict=True
                ):
                    # log-softmax moves by ≤ 2·max|Δlogit| a token, and an F32 GGUF keeps
                    # max|Δlogit| within 1e-3 of the logit range (llama.cpp's own converter:
                    # 3e-4, SPEC §6)
                    n = len(encode_pair(hf.encode, x["context"], c)[1])
                    assert abs(p - q) <= 2 * n * 1e-3 * span, (name, p, q, n, span)
            same = [
                x["pred"] == y["pred"] for x, y in zip(a["per_item"], b["per_item"], strict=True)
            ]
            assert all(same), name
            assert a["acc"] == b["acc"]
    finally:
        gg.close()


def test_compare_identical_models_reports_zero_with_an_interval_around_it(tmp_path, capsys):
    m = str(tiny_model_path())
    report = tmp_path / "cmp.json"
    args = ["eval", "--compare", f"{m},{m}", "--task", "jcommonsenseqa", "--limit", "30"]
    assert main(args + ["--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and "Δacc vs first" in out
    r = json.loads(report.read_text(encoding="utf-8"))["tasks"]["jcommonsenseqa"]
    (c,) = r["compare"]
    assert c["diff"] == 0.0 and c["ci95"][0] <= 0.0 <= c["ci95"][1]
    assert c["verdict"] == "kept" and c["same_choice"] == 1.0
    assert c["mcnemar"] == {"only_reference": 0, "only_this": 0, "p": 1.0}
    assert r["items"] == 30 and len(r["results"][1]["per_item"]) == 30
    assert main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "per_item" not in summary["tasks"]["jcommonsenseqa"]["results"][0]


@pytest.mark.parametrize(
    "task,limit,shots,chat",
    [("jcommonsenseqa", 25, 0, False), ("jnli", 25, 0, False), ("jcommonsenseqa", 8, 3, False)]
    + [("jnli", 8, 0, True)],
)
def test_lm_evaluation_harness_scores_the_same(task, limit, shots, chat):
    """lm-eval's own task configs and `hf` model on the same items: same prompts, per-item
    log-likelihoods within LOGLIK_RTOL, same outcomes (bench/lm_eval_crosscheck.py, full sets
    in bench/RESULTS.md)."""
    pytest.importorskip("lm_eval")
    from bench.lm_eval_crosscheck import crosscheck

    r = crosscheck(tiny_model_path(), task, limit, shots, chat)
    assert r["items"] == limit
    assert r["prompts_differ"] == [] and r["continuations_differ"] == []
    assert r["logliks_beyond_tolerance"] == [], r
    assert r["greedy_differ"] == [] and r["outcome_differ"] == []
    assert r["acc_agiasi"] == r["acc_lm_eval"]


def test_export_benchmark_rows_in_report_and_card(tiny_phi3_tok, tmp_path, capsys):
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    out = tmp_path / "out"
    for flags, message in [
        (["--benchmark", "jsquad"], "unknown task 'jsquad'"),
        (["--benchmark", "jnli:0"], "at least 1"),
        (["--benchmark", "jnli", "--no-measure"], "--no-measure skips it"),
    ]:
        assert main(["export", str(ckpt), "--out", str(out), "--gguf", "f32", *flags]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    args = ["export", str(ckpt), "--out", str(out), "--gguf", "f32", "--num-ctx", "512"]
    assert main(args + ["--benchmark", "jcommonsenseqa:12"]) == 0
    b = json.loads((out / "export_report.json").read_text(encoding="utf-8"))["benchmark"]
    assert b["task"] == "jcommonsenseqa" and b["items"] == 12
    assert list(b["rows"]) == ["wrapper (as trained)", "hf", "gguf f32"]
    for name in ("hf", "gguf f32"):
        row = b["rows"][name]
        assert row["ci95"][0] <= row["diff"] <= row["ci95"][1]
        assert 0.0 <= row["same_choice"] <= 1.0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "jcommonsenseqa (12 items, 0-shot" in card and "gguf f32" in card
