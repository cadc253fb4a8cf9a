"""The importance matrix: computed streamed layer by layer, llama.cpp's file format, the
quantizer's C array, the types that need it, and the export's with / without rows."""

import json

import numpy as np
import pytest
import torch

from agiasi.cli import main
from agiasi.export import ExportConfig, export
from agiasi.gguf.file_types import GGUF_TYPE_TABLE, KQUANT_TYPES
from agiasi.gguf.imatrix import (
    Imatrix,
    QuantizerImatrix,
    calibration_chunks,
    compute_imatrix,
    gguf_names,
    read_imatrix,
    write_imatrix,
)
from agiasi.gguf.writer import write_gguf
from agiasi.shipped import default_dataset, default_heldout, tiny_model_path
from agiasi.weights import LazyWeights
from tests.helpers import make_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoConfig, AutoTokenizer

    d = tiny_model_path()
    return d, AutoTokenizer.from_pretrained(d), AutoConfig.from_pretrained(d)


@pytest.fixture(scope="module")
def shipped_matrix(shipped, tmp_path_factory):
    """The shipped model's matrix on 16 chunks of the shipped sample, and its F16 GGUF."""
    d, tok, cfg = shipped
    root = tmp_path_factory.mktemp("imatrix")
    chunks = calibration_chunks(tok, default_dataset().read_text(encoding="utf-8"), 256, 4096)
    names = gguf_names(cfg.to_dict(), LazyWeights(d).keys())
    im = compute_imatrix(d, cfg, chunks, names, torch.device("cpu"))
    return im, chunks, write_gguf(d, root / "f16.gguf", "f16"), root


def test_the_streamed_matrix_equals_hooks_on_the_whole_model(shipped, shipped_matrix):
    from transformers import AutoModelForCausalLM

    d, _, cfg = shipped
    im, chunks, _, _ = shipped_matrix
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    names = gguf_names(cfg.to_dict(), LazyWeights(d).keys())
    ref, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in names:
            g = names[f"{name}.weight"]

            def hook(m, args, g=g):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                ref[g] = ref.get(g, 0) + x.pow(2).sum(0)

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for c in chunks:  # one chunk at a time, each its own sequence
            model(c[None])
    # every decoder matrix (4 per Phi-3 layer), none of the head
    assert set(im.sums) == set(ref) and len(ref) == 4 * cfg.num_hidden_layers
    assert "output.weight" not in im.sums
    for g, want in ref.items():
        want = want.numpy()
        assert im.counts[g] == chunks.numel()
        # fp32 sums over ≤ 4096 rows against float64: ~1e-7 × sqrt(rows) of the magnitude
        assert np.abs(im.sums[g] - want).max() <= 1e-5 * want.max(), g


def test_calibration_chunks_are_cut_like_llama_imatrix(shipped):
    _, tok, _ = shipped
    text = default_dataset().read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=True, verbose=False)["input_ids"]
    chunks = calibration_chunks(tok, text, 128, 1000)
    assert chunks.shape == (7, 128)  # the budget's whole chunks only
    assert chunks.flatten().tolist() == ids[: 7 * 128]  # this tokenizer adds no BOS
    with pytest.raises(Exception, match="at least 256"):
        calibration_chunks(tok, "短い文。", 128, 1000)


def test_the_file_round_trips_in_llama_cpps_layout(shipped_matrix, tmp_path):
    import gguf

    im, _, _, _ = shipped_matrix
    im.datasets = ["sample_ja.txt"]
    path = write_imatrix(tmp_path / "imatrix.gguf", im)
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.chunk_size"].contents() == 256
    names = {t.name for t in r.tensors}
    assert names == {f"{n}.{s}" for n in im.sums for s in ("in_sum2", "counts")}
    back = read_imatrix(path)
    assert back.chunks == im.chunks and back.datasets == ["sample_ja.txt"]
    assert back.counts == im.counts
    for n, s in im.sums.items():
        assert np.array_equal(back.sums[n], s.astype(np.float32).astype(np.float64))
    # what the quantizer is handed: the per-column mean as llama-quantize computes it from the
    # file (float32 sum / float32 count), from the file's values and from the ones in memory
    for m in (back.means(), im.means()):
        for n, v in m.items():
            want = back.sums[n].astype(np.float32) / np.float32(back.counts[n])
            assert v.dtype == np.float32 and np.array_equal(v, want), n


def _quantize(src, dst, t, matrix=None):
    """llama.cpp's quantizer called directly (not through agiasi): 0 on success."""
    import llama_cpp

    from agiasi.gguf.quantize import quiet_llama_cpp

    quiet_llama_cpp()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{GGUF_TYPE_TABLE[t].ftype}")
    p.nthread = 2
    if matrix is not None:
        p.imatrix = matrix.pointer()
    return llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)


def test_the_types_that_need_a_matrix_are_exactly_those_llama_cpp_refuses(shipped_matrix):
    _, _, f16, root = shipped_matrix
    refused = [t for t in KQUANT_TYPES if _quantize(f16, root / f"{t}-bare.gguf", t) != 0]
    assert refused == [t for t in KQUANT_TYPES if GGUF_TYPE_TABLE[t].needs_imatrix]
    assert {"iq2_xs", "iq2_m", "q2_k_s", "iq3_xxs"} <= set(refused)


def test_every_type_round_trips_through_llama_cpp(shipped_matrix, shipped):
    """Written with the matrix, loaded in llama.cpp, logits near the F16 file's. Quantization
    noise has variance ∝ 4^-b at b bits a weight and KL ≈ half the logit noise variance, so
    KL ≈ C · 4^-b with b the file's own bits a weight (16 × its size / the F16 file's); C is the
    model's sensitivity (52–123 for this model across all 16 types, 2026-12-02). Bounds: C in
    [16, 256] — a file that is not really quantized, or quantized wrongly, falls outside."""
    from agiasi.eval.models import GGUFModel
    from agiasi.export.parity import compare_all
    from agiasi.gguf.quantize import quantize_gguf

    im, _, f16, root = shipped_matrix
    _, tok, _ = shipped
    matrix = QuantizerImatrix(im)
    ids = tok(default_heldout().read_text(encoding="utf-8")[:2000])["input_ids"][:512]
    windows = [ids[:256], ids[256:512]]
    ref = GGUFModel(f16, n_ctx=256)
    want = [ref.logits(w) for w in windows]
    ref.close()
    sizes = {}
    for t in KQUANT_TYPES:
        path = quantize_gguf(f16, root / f"{t}.gguf", t, imatrix=matrix)
        g = GGUFModel(path, n_ctx=256)
        kl = compare_all(want, [g.logits(w) for w in windows])["mean_kl"]
        g.close()
        sizes[t] = path.stat().st_size
        bits = 16 * sizes[t] / f16.stat().st_size
        assert 16 * 4.0**-bits < kl < 256 * 4.0**-bits, (t, kl, bits)
    assert sizes["q6_k"] > sizes["q4_k_m"] > sizes["q3_k_m"] > sizes["iq2_xs"]


def test_the_quantizer_uses_the_matrix_and_the_file_records_it(shipped_matrix):
    import gguf
    import llama_cpp

    from agiasi.gguf.quantize import quantize_gguf
    from agiasi.info import describe_gguf

    im, _, f16, root = shipped_matrix
    im.datasets = ["sample_ja.txt"]
    lines = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    from agiasi.gguf import quantize

    quantize.quiet_llama_cpp()  # installed first, so the quantizer keeps our callback below
    llama_cpp.llama_log_set(keep, None)
    try:
        with_m = quantize_gguf(f16, root / "with.gguf", "q4_k_m", imatrix=QuantizerImatrix(im))
    finally:
        if quantize._LOG_CALLBACK is not None:  # None: AGIASI_LLAMA_LOG=1 keeps the log on
            llama_cpp.llama_log_set(quantize._LOG_CALLBACK, None)
    assert f"have importance matrix data with {len(im.sums)} entries" in "".join(lines)
    without = quantize_gguf(f16, root / "without.gguf", "q4_k_m")
    a, b = gguf.GGUFReader(str(with_m)), gguf.GGUFReader(str(without))
    differ = [
        t.name
        for t, u in zip(a.tensors, b.tensors, strict=True)
        if not np.array_equal(np.asarray(t.data), np.asarray(u.data))
    ]
    assert set(differ) <= set(im.sums) and len(differ) >= len(im.sums) // 2
    assert a.fields["quantize.imatrix.entries_count"].contents() == len(im.sums)
    assert a.fields["quantize.imatrix.dataset"].contents() == "sample_ja.txt"
    assert "quantize.imatrix.entries_count" not in b.fields
    info = describe_gguf(with_m)
    assert info["imatrix"]["entries"] == len(im.sums)
    assert info["tensor_types"]["Q4_K"] > 0 and "F32" in info["tensor_types"]
    assert describe_gguf(without)["imatrix"] is None


def test_export_computes_the_matrix_and_reports_with_and_without(tiny_phi3_tok, tmp_path):
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    out = tmp_path / "out"
    report = export(
        ExportConfig(
            checkpoint=str(ckpt),
            out=str(out),
            gguf="f16,q4_k_m,iq2_xs",
            num_ctx=256,
            calibration_tokens=2048,
            benchmark="jcommonsenseqa:8",
        ),
        log=quiet,
    )
    files = sorted(p.name for p in out.iterdir())
    assert "imatrix.gguf" in files and not any(f.startswith(".") for f in files)
    im = report["imatrix"]
    assert im["source"] == "the shipped Japanese sample" and im["file"] == "imatrix.gguf"
    assert im["types"] == ["q4_k_m", "iq2_xs"] and im["tokens"] <= 2048
    back = read_imatrix(out / "imatrix.gguf")
    assert back.datasets == ["the shipped Japanese sample"] and back.chunks == im["chunks"]
    # Q4_K_M measured with and without; IQ2_XS cannot be made without, so it has one row
    e = im["effect"]
    assert set(e) == {"q4_k_m"}
    assert e["q4_k_m"]["kl_ratio"] == pytest.approx(
        e["q4_k_m"]["heldout_kl_with"] / e["q4_k_m"]["heldout_kl_without"]
    )
    assert "gguf q4_k_m (no imatrix) vs hf" in report["parity"]
    assert "gguf iq2_xs (no imatrix) vs hf" not in report["parity"]
    assert json.loads((out / "export_report.json").read_text())["imatrix"] == im
    # the benchmark scores the control too, on the same items
    rows = report["benchmark"]["rows"]
    assert {"gguf q4_k_m", "gguf q4_k_m (no imatrix)", "gguf iq2_xs"} <= set(rows)


def test_imatrix_none_warns_for_low_bit_types_and_writes_no_matrix(tiny_phi3_tok, tmp_path):
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    said = []
    report = export(
        ExportConfig(
            checkpoint=str(ckpt),
            out=str(tmp_path / "out"),
            gguf="q5_k_m,q4_k_m",
            imatrix="none",
            measure=False,
        ),
        log=said.append,
    )
    warn = [m for m in said if "without an importance matrix" in m]
    assert len(warn) == 1 and "q4_k_m" in warn[0] and "q5_k_m" not in warn[0]
    assert report["imatrix"] is None and not (tmp_path / "out" / "imatrix.gguf").exists()


def test_the_run_validation_data_is_the_default_calibration(tiny_phi3_tok, tmp_path):
    from agiasi.export.calibration import choose_calibration

    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    val = tmp_path / "val.txt"
    val.write_text("検証用の文章です。\n" * 50, encoding="utf-8")
    (ckpt / "train_config.json").write_text(json.dumps({"eval_dataset": str(val)}))
    assert choose_calibration(None, ckpt, None).dataset == str(val)
    (ckpt / "train_config.json").write_text(
        json.dumps({"dataset": str(default_dataset()), "eval_split": 0.1, "seed": 3})
    )
    cal = choose_calibration(None, ckpt, None)
    assert cal.eval_split == 0.1 and cal.seed == 3 and "held out" in cal.source


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gguf", "iq2_xs", "--imatrix", "none"], "IQ2_XS needs an importance matrix"),
        (["--gguf", "q2_k_s", "--imatrix", "none"], "Q2_K_S needs an importance matrix"),
        (["--imatrix", "none", "--calibration", "x.txt"], "--imatrix none turns the matrix off"),
        (["--imatrix", "missing.gguf"], "--imatrix missing.gguf: no such file"),
        (["--calibration", "missing.txt"], "--calibration missing.txt: no such file"),
        (["--calibration", "SAME", "--text", "SAME"], "--calibration and --text are the same"),
        (["--gguf", "q4_k_m", "--imatrix", "OTHER"], "an importance matrix for another model"),
        (["--gguf", "q4_k_m", "--imatrix", "NOTIMATRIX"], "is not an importance matrix"),
        (["--gguf", "q4_k_m", "--imatrix", "PARTIAL"], "decoder matrices (no blk.1."),
    ],
)
def test_bad_imatrix_flags_exit_2_and_write_nothing(
    tiny_phi3_tok, tmp_path, capsys, monkeypatch, flags, message
):
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    monkeypatch.chdir(tmp_path)
    same = tmp_path / "same.txt"
    same.write_text("同じ文章。" * 100, encoding="utf-8")
    other = Imatrix(sums={"blk.0.attn_qkv.weight": np.ones(8)}, counts={"blk.0.attn_qkv.weight": 4})
    other.datasets = ["x"]
    write_imatrix(tmp_path / "other.gguf", other)
    subs = {"SAME": str(same), "OTHER": str(tmp_path / "other.gguf")}
    subs["NOTIMATRIX"] = str(write_gguf(tiny_phi3_tok, tmp_path / "model.gguf", "f16"))
    # layer 0 of the right model only: names and columns right, the other layers missing
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_phi3_tok)
    names = gguf_names(cfg.to_dict(), LazyWeights(tiny_phi3_tok).keys())
    shapes = {g: LazyWeights(tiny_phi3_tok).shape(k) for k, g in names.items()}
    part = {g: s for g, s in shapes.items() if g.startswith("blk.0.")}
    partial = Imatrix(
        sums={g: np.ones(s[-1]) for g, s in part.items()}, counts={g: 4 for g in part}
    )
    partial.datasets = ["x"]
    subs["PARTIAL"] = str(write_imatrix(tmp_path / "partial.gguf", partial))
    flags = [subs.get(f, f) for f in flags]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len([x for x in err if "error" in x]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
