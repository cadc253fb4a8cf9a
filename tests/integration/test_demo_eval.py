"""`agiasi demo` (short setting) and `agiasi eval` on the shipped tiny Japanese model."""

import json
import os

import pytest

from agiasi.cli import main
from agiasi.demo import PROMPT, tiny_model_path
from tests.helpers import TRAINED_STEP_FILES

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


def test_shipped_model_writes_japanese():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 25 * 2**20
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"]
    assert cfg["hidden_size"] % 256 == 0 and cfg["intermediate_size"] % 256 == 0
    tok = AutoTokenizer.from_pretrained(path)
    for special in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    assert (path / "tokenizer.model").is_file() and tok.chat_template
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("Debian パッケージを", add_special_tokens=False, return_tensors="pt")["input_ids"]
    text = tok.decode(
        m.generate(ids, max_new_tokens=20, do_sample=False)[0][ids.shape[1] :],
        skip_special_tokens=True,
    )
    japanese = sum(1 for ch in text if "\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff")
    assert japanese >= 8, text


def test_demo_default_run(tmp_path, capsys):
    """The demo as shipped (60 steps, α through every phase): it writes what it says, its export
    is within tolerance, and injection training lowers held-out perplexity. With the default
    convex mix the soul run scores as the plain-QLoRA control does; the note's residual mix
    (gate open at σ(φ) ≈ 0.83 scales the logits) costs perplexity, shown on its own line."""
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "== agiasi demo ==" in printed and "held-out perplexity" in printed
    assert "after soul injection (convex mix, default)" in printed
    assert "the note's residual mix h + g·R h" in printed
    report = json.loads((out / "demo_report.json").read_text())
    ckpt = out / "run_soul" / "step_60"
    assert sorted(os.listdir(ckpt)) == TRAINED_STEP_FILES
    soul = json.loads((ckpt / "soul.json").read_text())["soul"]
    assert abs(soul["alpha"] - (1 + 5**0.5) / 2) < 1e-6 and soul["gate"] > 0.83
    assert (out / "run_control" / "step_60" / "soul.json").exists()
    resid = json.loads((out / "run_residual" / "step_60" / "soul.json").read_text())["soul"]
    assert soul["mix"] == "convex" and resid["mix"] == "residual"
    assert (out / "run_soul" / "phase_transition.png").exists()
    exp = out / "export"
    names = sorted(os.listdir(exp))
    assert {"Modelfile", "README.md", "export_report.json", "hf"} <= set(names)
    # q8_0, q4_k_m and the importance matrix Q4_K_M was made with; the f16 intermediate gone
    assert sorted(n.rsplit("-", 1)[-1] for n in names if n.endswith(".gguf")) == [
        "imatrix.gguf",
        "q4_k_m.gguf",
        "q8_0.gguf",
    ]
    assert "PARAMETER num_ctx 256" in (exp / "Modelfile").read_text()
    er = report["export_report"]
    assert er["merge_base"] == "nf4"
    assert er["parity"]["wrapper_fp32 vs hf"]["max_abs_dlogit"] <= 1e-4
    assert er["parity"]["gguf q8_0 vs hf"]["top1"] >= 0.90
    assert er["parity"]["gguf q8_0 vs hf"]["tokens_equal"]
    assert er["merge_bases"]["nf4"]["mean_kl"] < er["merge_bases"]["w16"]["mean_kl"]
    im = er["imatrix"]
    assert im["types"] == ["q4_k_m"] and im["chunks"] == 64 and im["chunk_size"] == 256
    assert im["effect"]["q4_k_m"]["heldout_kl_without"] > 0
    p = report["perplexity"]
    print(
        f"held-out ppl: base {p['base']:.2f}, soul {p['soul']:.2f}, control {p['control_no_soul']:.2f}"
    )
    assert p["soul"] < p["base"] and p["control_no_soul"] < p["base"]
    assert p["soul"] <= p["control_no_soul"] * 1.01  # the convex soul costs nothing
    assert p["residual_mix"] > p["soul"] * 1.1  # the note's mix does
    # the exported (merged + folded) model scores what the trained checkpoint scored
    assert er["eval_text"]["window"] == 256 and er["eval_text"]["tokens"] == p["tokens"]
    assert abs(er["parity"]["hf"]["ppl"] / p["soul"] - 1) < 0.01
    assert abs(er["parity"]["gguf q8_0 vs hf"]["ppl"] / p["soul"] - 1) < 0.02
    gens = report["generation"]
    assert gens["hf"].startswith(PROMPT) and len(gens) == 3
    metrics = [json.loads(x) for x in (out / "run_soul" / "metrics.jsonl").read_text().splitlines()]
    phases = {m["phase"] for m in metrics}
    assert {"🔵 Stable", "🟡 Transitioning", "🟢 Golden Ratio Reached"} <= phases
    # the rotation moved away from the identity, and stayed orthogonal
    # (from the first step with a learning rate above 0: a warm-up starts at 0, as in transformers)
    first = next(m for m in metrics if m["lr"] > 0)
    assert first["rotation_distance"] > 0 and metrics[-1]["rotation_distance"] > 1e-3
    assert max(m["ortho_loss"] for m in metrics) < 1e-5


def test_eval_hf_and_f32_gguf_agree(tmp_path, capsys):
    from agiasi.gguf.writer import write_gguf

    gguf = write_gguf(tiny_model_path(), tmp_path / "tiny-f32.gguf", "f32")
    rc1 = main(["eval", str(tiny_model_path()), "--json", "--max-tokens", "1024"])
    hf = json.loads(capsys.readouterr().out)
    rc2 = main(["eval", str(gguf), "--json", "--max-tokens", "1024"])
    gg = json.loads(capsys.readouterr().out)
    assert rc1 == rc2 == 0
    assert hf["kind"] == "hf" and gg["kind"] == "gguf"
    # the default window stops at the 256 positions the tiny model was trained on, in both
    assert hf["window"] == gg["window"] == hf["trained_context"] == gg["trained_context"] == 256
    assert hf["tokens"] == gg["tokens"] == 1024
    assert abs(gg["perplexity"] / hf["perplexity"] - 1) < 0.01, (hf, gg)
    assert 1.0 < hf["chars_per_token"] < 4.0
    assert main(["eval", str(tmp_path / "nothing.gguf")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_learned_alpha_lowers_heldout_perplexity_and_closes_the_gate(tmp_path):
    """``--alpha-mode learned`` with the note's residual mix: α is an optimizer parameter from
    −5. On this data the task loss pushes it *down* — left to choose, the residual soul keeps its
    gate shut (opening it scales the logits) — and held-out perplexity falls like the control's."""
    from agiasi.eval.perplexity import EvalConfig, evaluate
    from agiasi.shipped import default_heldout
    from agiasi.train.loop import TrainConfig, train

    base = tiny_model_path()
    ev = dict(text=str(default_heldout()), window=256, max_tokens=2048)
    before = evaluate(EvalConfig(model=str(base), **ev))["perplexity"]
    r = train(
        TrainConfig(
            base_model=str(base),
            output_dir=str(tmp_path / "learned"),
            max_steps=24,
            warmup_steps=3,
            annealing_steps=15,
            batch_size=4,
            max_length=256,
            learning_rate=1e-3,
            soul_learning_rate=5e-2,
            save_steps=24,
            alpha_mode="learned",
            soul_mix="residual",
            seed=0,
            progress=False,
        ),
        log=lambda m: None,
    )
    after = evaluate(EvalConfig(model=str(r.final_checkpoint), **ev))["perplexity"]
    alpha = json.loads((r.final_checkpoint / "soul.json").read_text())["soul"]["alpha"]
    print(f"held-out ppl: base {before:.2f}, soul (learned α, ends at {alpha:.2f}) {after:.2f}")
    assert after < before * 0.8
    assert alpha < -5.0
