"""`agiasi export`: merge + fold, HF folder in plain transformers, GGUF in llama.cpp, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from agiasi.cli import main
from agiasi.errors import AgiasiError
from agiasi.export import ExportConfig, export
from agiasi.export.merge import fold_soul, merge_lora
from agiasi.weights import check_plain
from tests.helpers import (
    build_tiny_llama_with_tokenizer,
    build_tiny_phi3_longrope_with_tokenizer,
    make_checkpoint,
    make_wrapper,
    randomize_lora,
)

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
JA_LINES = [
    "日本語の文章を生成します。",
    "パッケージを作成する手順を説明してください。",
    "メールの設定を確認しましょう。",
]


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def phi3_export(tiny_phi3_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3_export")
    ckpt = make_checkpoint(tiny_phi3_tok, root / "run" / "step_10")
    report = export(
        ExportConfig(
            checkpoint=str(ckpt), out=str(root / "out"), gguf="f32,f16,q8_0,q4_k_m", num_ctx=512
        ),
        log=quiet,
    )
    return ckpt, root / "out", report


def plain_transformers_logits(hf_dir, ids):
    """Logits from a fresh interpreter that never imports agiasi."""
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, dtype=torch.float32).eval()\n"
        f"print(json.dumps(m(torch.tensor([{ids!r}])).logits[0].tolist()))\n"
        "assert not any(k.startswith('agiasi') for k in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


def test_phi3_export_writes_exactly_the_files(phi3_export):
    _, out, report = phi3_export
    names = sorted(os.listdir(out))
    # the importance matrix Q4_K_M was quantized with sits beside the GGUFs
    assert names[:5] == ["Modelfile", "README.md", "export_report.json", "hf", "imatrix.gguf"]
    assert sorted(n.rsplit("-", 1)[-1] for n in names[5:]) == [
        "f16.gguf",
        "f32.gguf",
        "q4_k_m.gguf",
        "q8_0.gguf",
    ]
    hf = sorted(os.listdir(out / "hf"))
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert f in hf, f
    assert json.loads((out / "export_report.json").read_text()) == json.loads(json.dumps(report))
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())


def assert_same_gguf(a, b):
    """Two GGUF files hold the same metadata and the same tensors, bit for bit (names, types,
    shapes, bytes); the order of the tensors in the file may differ."""
    import gguf

    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    fa = {k: f.contents() for k, f in ra.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in rb.fields.items() if not k.startswith("GGUF.")}
    assert fa == fb
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    assert sorted(ta) == sorted(tb)
    for name, t in ta.items():
        u = tb[name]
        assert (t.tensor_type, list(t.shape)) == (u.tensor_type, list(u.shape)), name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8))


def test_streamed_ggufs_equal_ggufs_written_from_the_hf_folder(phi3_export, tmp_path):
    """The export writes its F32/F16 GGUFs from the merged tensors on their way into the HF
    shards; the files are the ones write_gguf makes from the written folder."""
    from agiasi.gguf.writer import write_gguf

    _, out, _ = phi3_export
    for t in ("f32", "f16"):
        (streamed,) = out.glob(f"*-{t}.gguf")
        assert_same_gguf(streamed, write_gguf(out / "hf", tmp_path / f"{t}.gguf", t))


def test_hf_folder_in_plain_transformers_equals_wrapper(phi3_export):
    from agiasi import AGIASI_SO8T_Wrapper

    ckpt, out, _ = phi3_export
    w = AGIASI_SO8T_Wrapper.from_checkpoint(
        ckpt, device="cpu", quantization="none", dtype="float32", lora_dropout=0.0
    ).eval()
    ids = [17, 250, 33, 401, 9, 77, 512, 600]
    with torch.no_grad():
        want = w(torch.tensor([ids])).logits[0].numpy()
    got = plain_transformers_logits(out / "hf", ids)
    assert np.abs(got - want).max() <= 1e-4
    # the soul is really in there: the unfolded head gives other logits
    with torch.no_grad():
        h = w.hidden_states(torch.tensor([ids]))[0]
        unfolded = (h @ w.head.weight.T).numpy()
    assert np.abs(unfolded - want).max() > 1e-2


def test_gguf_parity_numbers(phi3_export):
    _, _, report = phi3_export
    p = report["parity"]
    assert p["wrapper_fp32 vs hf"]["max_abs_dlogit"] <= 1e-4
    f32 = p["gguf f32 vs hf"]
    assert f32["rel_dlogit"] <= 1e-3 and f32["greedy_equal"] and f32["tokens_equal"]
    assert p["gguf f16 vs hf"]["top1"] >= 0.99
    assert p["gguf q8_0 vs hf"]["mean_kl"] < 1e-2
    assert report["eval_text"]["chars_per_token"] > 0.5


def test_gguf_in_llama_cpp_directly(phi3_export):
    """Our own check, not the report's: logits, greedy 32 tokens, tokenization, quants generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agiasi.eval.models import GGUFModel, hf_greedy

    _, out, _ = phi3_export
    tok = AutoTokenizer.from_pretrained(out / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    f32 = GGUFModel(next(out.glob("*-f32.gguf")), n_ctx=512)
    for line in JA_LINES:
        ids = tok(line, add_special_tokens=False)["input_ids"]
        assert f32.tokenize(line) == ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        got = f32.logits(ids)
        assert np.abs(got - ref).max() <= 1e-3 * (ref.max() - ref.min())
    prompt = tok(JA_LINES[0], add_special_tokens=False)["input_ids"]
    assert f32.greedy(prompt, 32) == hf_greedy(hf, prompt, 32)
    for q in ("q8_0", "q4_k_m"):
        g = GGUFModel(next(out.glob(f"*-{q}.gguf")), n_ctx=512)
        text = g.llm.create_completion(JA_LINES[1], max_tokens=8, temperature=0.0)["choices"][0][
            "text"
        ]
        assert isinstance(text, str) and len(g.greedy(prompt, 8)) == 8


def test_tied_llama_family_export(tmp_path):
    model = build_tiny_llama_with_tokenizer(tmp_path / "llama", tie=True)
    ckpt = make_checkpoint(model, tmp_path / "run" / "step_10")
    report = export(
        ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "out"), gguf="f32,q8_0", num_ctx=512),
        log=quiet,
    )
    cfg = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    p = report["parity"]
    assert p["wrapper_fp32 vs hf"]["max_abs_dlogit"] <= 1e-4
    assert p["gguf f32 vs hf"]["rel_dlogit"] <= 1e-3 and p["gguf f32 vs hf"]["greedy_equal"]
    assert p["gguf f32 vs hf"]["tokens_equal"]
    # the input embedding was not changed by the fold (untied first)
    from safetensors.torch import load_file

    base = load_file(str(model / "model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "hf" / "model.safetensors"))
    assert torch.equal(base["model.embed_tokens.weight"], exported["model.embed_tokens.weight"])
    assert not torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"])
    # the Llama's q/k rows are permuted for GGML on the stream just as from the folder
    from agiasi.gguf.writer import write_gguf

    (streamed,) = (tmp_path / "out").glob("*-f32.gguf")
    assert_same_gguf(streamed, write_gguf(tmp_path / "out" / "hf", tmp_path / "f32.gguf", "f32"))


def test_longrope_phi3_reports_both_contexts(tmp_path):
    model = build_tiny_phi3_longrope_with_tokenizer(tmp_path / "lr")
    ckpt = make_checkpoint(model, tmp_path / "run" / "step_10")
    report = export(
        ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "out"), gguf="f32", num_ctx=512),
        log=quiet,
    )
    short = report["parity"]["gguf f32 vs hf"]
    assert short["rel_dlogit"] <= 1e-3 and short["top1"] == 1.0
    assert report["long_context"]["n_ctx"] == 768  # just past the original 512: long factors
    # llama.cpp switches to the long factors with a big context: a different model
    assert report["long_context"]["rel_dlogit"] > 10 * short["rel_dlogit"]
    assert "PARAMETER num_ctx 512" in (tmp_path / "out" / "Modelfile").read_text()


def test_nf4_checkpoint_measures_both_merge_bases(tiny_phi3_tok, tmp_path):
    pytest.importorskip("bitsandbytes")
    ckpt = make_checkpoint(
        tiny_phi3_tok, tmp_path / "run" / "step_10", quantization="nf4", dtype="auto"
    )
    report = export(
        ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "out"), gguf=""), log=quiet
    )
    assert report["merge_base"] == "nf4"  # auto picks the measured winner for NF4 checkpoints
    mb = report["merge_bases"]
    print(json.dumps(mb))
    assert set(mb) == {"w16", "nf4"}
    # the LoRA was trained over NF4 weights: merging into them reproduces the trained model better
    assert mb["nf4"]["mean_kl"] < mb["w16"]["mean_kl"]


def test_merge_lora_equals_peft_merge(tiny_phi3):
    w = make_wrapper(tiny_phi3, soul=False)
    randomize_lora(w)
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(w.base_model)
    base = {
        k: v.clone()
        for k, v in w.base_model.get_base_model().state_dict().items()
        if "lora_" not in k
    }
    base = {k.replace(".base_layer", ""): v for k, v in base.items()}
    merged = merge_lora(base, adapter, 32, 16)
    ref = w.base_model.merge_and_unload().state_dict()
    for k, v in ref.items():
        assert torch.allclose(merged[k], v, atol=1e-6), k
    check_plain(merged)


def test_fold_soul_unties_and_check_plain_refuses_leftovers():
    sd = {"model.embed_tokens.weight": torch.randn(10, 8)}
    r = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    out = fold_soul(sd, r, 0.5, tied=True, mix="residual")
    assert "lm_head.weight" in out and torch.equal(
        out["model.embed_tokens.weight"], sd["model.embed_tokens.weight"]
    )
    with pytest.raises(AgiasiError, match="LoRA/soul tensor"):
        check_plain({**out, "x.lora_A.weight": torch.zeros(1)})


def test_export_errors_write_nothing(tiny_phi3_tok, tmp_path, capsys):
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    # existing folder without --force
    (tmp_path / "exists").mkdir()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "exists")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert os.listdir(tmp_path / "exists") == []
    # a base without tokenizer.model
    import shutil

    notok = tmp_path / "notok"
    shutil.copytree(tiny_phi3_tok, notok)
    (notok / "tokenizer.model").unlink()
    assert (
        main(["export", str(ckpt), "--out", str(tmp_path / "o1"), "--base-model", str(notok)]) == 2
    )
    assert "no tokenizer.model" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    # unknown GGUF type
    assert main(["export", str(ckpt), "--out", str(tmp_path / "o2"), "--gguf", "q3_x"]) == 2
    assert "unknown GGUF type" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unknown_architecture_export_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from agiasi.testing.tokenizer import build_phi3_tokenizer
    from tests.helpers import sample_text

    d = tmp_path / "gpt2"
    tok = build_phi3_tokenizer([sample_text()], d)
    GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=len(tok))
    ).save_pretrained(d)
    ckpt = make_checkpoint(d, tmp_path / "run" / "step_10", lora_targets=["c_attn"])
    assert main(["export", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "does not support architecture 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mix", ["residual", "legacy"])
def test_the_notes_residual_mix_exports_exactly_too(tiny_phi3_tok, tmp_path, mix):
    """Default exports are convex (the fixture above); the note's residual mix folds as
    W + g·W R, also for step folders written before the option existed."""
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10", soul_mix="residual")
    if mix == "legacy":
        meta = json.loads((ckpt / "soul.json").read_text(encoding="utf-8"))
        meta["model"].pop("soul_mix", None)
        del meta["soul"]["mix"]
        (ckpt / "soul.json").write_text(json.dumps(meta), encoding="utf-8")
    report = export(
        ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "out"), gguf="f32", num_ctx=512),
        log=quiet,
    )
    p = report["parity"]
    assert p["wrapper_fp32 vs hf"]["max_abs_dlogit"] <= 1e-4
    assert p["gguf f32 vs hf"]["rel_dlogit"] <= 1e-3 and p["gguf f32 vs hf"]["top1"] == 1.0
    # and it is not the convex fold: the same checkpoint read as convex gives other logits
    from agiasi import AGIASI_SO8T_Wrapper

    ids = torch.tensor([[17, 250, 33, 401, 9]])
    convex = AGIASI_SO8T_Wrapper.from_checkpoint(
        ckpt, device="cpu", quantization="none", dtype="float32", soul_mix="convex"
    ).eval()
    with torch.no_grad():
        want_convex = convex(ids).logits[0].numpy()
    got = plain_transformers_logits(tmp_path / "out" / "hf", ids[0].tolist())
    assert np.abs(got - want_convex).max() > 1e-2


# --------------------------------------------------------------------------- preflight, failures


def test_a_missing_dependency_fails_before_any_work(tiny_phi3_tok, tmp_path, capsys, monkeypatch):
    """K-quants without llama-cpp-python: one line, exit 2, nothing written (checked before the
    merge: the model is never read)."""
    import importlib.util

    import agiasi.weights

    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a)
    )

    def no_read(*a, **k):
        raise AssertionError("the base model was read before the dependency check")

    monkeypatch.setattr(agiasi.weights.LazyWeights, "get", no_read)
    rc = main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--gguf", "f16,q4_k_m"])
    err = capsys.readouterr().err
    assert rc == 2 and "Q4_K_M needs llama.cpp's quantizer: pip install llama-cpp-python" in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_without_llama_cpp_the_measure_runs_what_it_can(tiny_phi3_tok, tmp_path, monkeypatch):
    import agiasi.export.run
    import agiasi.gguf.quantize

    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    monkeypatch.setattr(
        agiasi.gguf.quantize, "have_quantizer", lambda: False
    )  # Q8_0 through gguf-py
    real = agiasi.export.run.preflight_dependencies
    monkeypatch.setattr(agiasi.export.run, "preflight_dependencies", lambda *a: real(*a) and False)
    report = export(
        ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "out"), gguf="q8_0", num_ctx=256),
        log=quiet,
    )
    assert report["parity"]["wrapper_fp32 vs hf"]["max_abs_dlogit"] <= 1e-4
    assert not any(k.startswith("gguf") for k in report["parity"])
    assert report["measure"]["skipped"] == ["gguf rows: running a GGUF needs llama-cpp-python"]
    assert [p.name.rsplit("-", 1)[-1] for p in (tmp_path / "out").glob("*.gguf")] == ["q8_0.gguf"]


def test_too_little_disk_is_refused_before_any_work(tiny_phi3_tok, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**5, 10**5))
    rc = main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--gguf", "f16"])
    err = capsys.readouterr().err
    assert rc == 2 and "not enough disk space for this export" in err and "GiB are free" in err
    assert not (tmp_path / "out").exists()


def test_a_failed_measure_keeps_the_export(tiny_phi3_tok, tmp_path, capsys, monkeypatch):
    """The model is written and loadable; the report says which stage failed; exit is non-zero."""
    import agiasi.export.parity

    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")

    def broken(run):
        raise RuntimeError("llama.cpp crashed")

    monkeypatch.setattr(agiasi.export.parity, "_gguf_rows", broken)
    rc = main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--gguf", "f32"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "is complete and loadable, but its fidelity measure failed at 'gguf'" in err
    out = tmp_path / "out"
    report = json.loads((out / "export_report.json").read_text())
    assert report["measure"] == {
        "status": "failed",
        "stage": "gguf",
        "error": "RuntimeError: llama.cpp crashed",
    }
    assert "the measure failed at 'gguf'" in (out / "README.md").read_text()
    assert any(p.suffix == ".gguf" for p in out.iterdir())
    ids = [17, 250, 33, 401]
    assert plain_transformers_logits(out / "hf", ids).shape == (
        4,
        json.loads((out / "hf" / "config.json").read_text())["vocab_size"],
    )
