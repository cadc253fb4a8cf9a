"""`agiasi demo` (short setting) and `agiasi eval` on the shipped tiny Japanese model."""

import json
import os

import pytest

from agiasi.cli import main
from agiasi.demo import tiny_model_path

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


def test_demo_short_run(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--max-steps", "8", "--eval-tokens", "512"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "== agiasi demo ==" in printed and "held-out perplexity" in printed
    report = json.loads((out / "demo_report.json").read_text())
    ckpt = out / "run_soul" / "step_8"
    assert sorted(os.listdir(ckpt)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "soul.json",
        "soul.pt",
        "train_config.json",
        "trainer_state.pt",
    ]
    assert (out / "run_control" / "step_8" / "soul.json").exists()
    assert (out / "run_soul" / "phase_transition.png").exists()
    exp = out / "export"
    names = sorted(os.listdir(exp))
    assert {"Modelfile", "README.md", "export_report.json", "hf"} <= set(names)
    assert sum(n.endswith(".gguf") for n in names) == 2  # q8_0 and q4_k_m, f16 intermediate gone
    er = report["export_report"]
    assert er["merge_base"] == "nf4"
    assert er["parity"]["wrapper_fp32 vs hf"]["max_abs_dlogit"] <= 1e-4
    assert er["parity"]["gguf q8_0 vs hf"]["top1"] >= 0.90
    assert er["parity"]["gguf q8_0 vs hf"]["tokens_equal"]
    assert er["merge_bases"]["nf4"]["mean_kl"] < er["merge_bases"]["w16"]["mean_kl"]
    p = report["perplexity"]
    assert 1 < p["base"] < 200 and p["control_no_soul"] is not None
    gens = report["generation"]
    assert gens["hf"].startswith("Debian パッケージを") and len(gens) == 3
    metrics = [json.loads(x) for x in (out / "run_soul" / "metrics.jsonl").read_text().splitlines()]
    phases = {m["phase"] for m in metrics}
    assert "🔵 Stable" in phases and "🟢 Golden Ratio Reached" in phases


def test_eval_hf_and_f32_gguf_agree(tmp_path, capsys):
    from agiasi.gguf import write_gguf

    gguf = write_gguf(tiny_model_path(), tmp_path / "tiny-f32.gguf", "f32")
    rc1 = main(["eval", str(tiny_model_path()), "--json", "--max-tokens", "1024"])
    hf = json.loads(capsys.readouterr().out)
    rc2 = main(["eval", str(gguf), "--json", "--max-tokens", "1024"])
    gg = json.loads(capsys.readouterr().out)
    assert rc1 == rc2 == 0
    assert hf["kind"] == "hf" and gg["kind"] == "gguf"
    assert hf["tokens"] == gg["tokens"] == 1024
    assert abs(gg["perplexity"] / hf["perplexity"] - 1) < 0.01, (hf, gg)
    assert 1.0 < hf["chars_per_token"] < 4.0
    assert main(["eval", str(tmp_path / "nothing.gguf")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_injection_does_not_raise_heldout_perplexity_learned_alpha(tmp_path):
    """Learned α: the soul is trained with the LoRA and held-out perplexity stays with the
    control's. (With the note's schedule, α forced to φ multiplies the logits by ≈ 1 + g at
    R ≈ I; see the demo's numbers and the issue notes.)"""
    from agiasi.data import default_heldout
    from agiasi.evaluate import EvalConfig, evaluate
    from agiasi.train import TrainConfig, train

    base = tiny_model_path()
    ev = dict(text=str(default_heldout()), window=256, max_tokens=2048)
    before = evaluate(EvalConfig(model=str(base), **ev))["perplexity"]
    ppl = {}
    for name, soul in (("soul", True), ("control", False)):
        r = train(
            TrainConfig(
                base_model=str(base),
                output_dir=str(tmp_path / name),
                max_steps=24,
                warmup_steps=3,
                annealing_steps=15,
                batch_size=4,
                max_length=256,
                learning_rate=1e-3,
                soul_learning_rate=5e-2,
                save_steps=24,
                alpha_mode="learned",
                soul=soul,
                seed=0,
                progress=False,
            ),
            log=lambda m: None,
        )
        ppl[name] = evaluate(EvalConfig(model=str(r.final_checkpoint), **ev))["perplexity"]
    print(
        f"held-out ppl: base {before:.2f}, soul (learned α) {ppl['soul']:.2f}, "
        f"control {ppl['control']:.2f}"
    )
    assert ppl["soul"] <= before * 1.10
    assert ppl["soul"] <= ppl["control"] * 1.05
