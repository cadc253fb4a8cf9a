"""Every architecture in agiasi's table, end to end on a tiny random model of that architecture
with its family's kind of tokenizer: `agiasi train` (NF4, a few steps) → step folder →
`agiasi export` (HF + F32 + Q8_0) → plain transformers equals the trained wrapper → llama.cpp
equals transformers and tokenizes Japanese the same way."""

import json

import numpy as np
import pytest
import torch

from agiasi.architectures import ARCHITECTURES
from agiasi.cli import main
from tests.helpers import ZOO, build_tiny_arch, cli_args, sample_text

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

# kanji, hiragana, katakana, half-width katakana, emoji, ASCII and full-width digits, punctuation
from agiasi.testing.zoo import JA_TEXTS, ZOO_MODEL_TYPE  # noqa: E402


def test_the_zoo_covers_every_exportable_architecture():
    exportable = {a.model_type for a in ARCHITECTURES.values() if a.exports_gguf}
    assert exportable == set(ZOO_MODEL_TYPE.values())
    # both vocabulary kinds of the llama row are in the zoo
    assert {"llama-sp", "llama-bpe"} <= set(ZOO)


def _train(model, out, *flags) -> str:
    rc = main(
        cli_args(
            "train",
            *flags,
            base_model=model,
            dataset=sample_text(),
            output_dir=out,
            max_steps=3,
            save_steps=3,
            warmup_steps=1,
            annealing_steps=2,
            batch_size=2,
            max_length=64,
            learning_rate=1e-2,
            soul_learning_rate=5e-2,
            progress=False,
        )
    )
    assert rc == 0
    return str(out / "step_3")


def _export(ckpt, out, gguf: str):
    return main(cli_args("export", ckpt, out=out, gguf=gguf, num_ctx=512, measure=False))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _rel(got, ref):
    return float(np.abs(got - ref).max() / (ref.max() - ref.min()))


def _check_hf_equals_wrapper(ckpt, hf_dir, tok):
    from transformers import AutoModelForCausalLM

    from agiasi import AGIASI_SO8T_Wrapper

    w = AGIASI_SO8T_Wrapper.from_checkpoint(ckpt, device="cpu", dtype="float32").eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for text in JA_TEXTS:
        ids = torch.tensor([_ids(tok, text)])
        with torch.no_grad():
            want, got = w(ids).logits[0].numpy(), hf(ids).logits[0].numpy()
        assert _rel(got, want) <= 1e-4, text
    return hf


def _check_llama_cpp_equals_hf(out, hf, tok):
    from agiasi.eval.models import GGUFModel

    f32 = GGUFModel(next(out.glob("*-f32.gguf")), n_ctx=512)
    for text in JA_TEXTS:
        ids = _ids(tok, text)
        assert f32.tokenize(text) == ids, text
        # and by default (BOS where HF adds one, none where it does not), as Ollama tokenizes
        assert f32.tokenize(text, add_special=True) == tok(text)["input_ids"], text
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        got = f32.logits(ids)
        assert _rel(got, ref) <= 1e-3, text
        assert (got.argmax(-1) == ref.argmax(-1)).all(), text
    q8 = GGUFModel(next(out.glob("*-q8_0.gguf")), n_ctx=512)
    ids = _ids(tok, JA_TEXTS[0])
    p, q = (torch.tensor(x).log_softmax(-1) for x in (f32.logits(ids), q8.logits(ids)))
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 1e-2  # KL(F32 ‖ Q8_0)
    f32.close()
    q8.close()


@pytest.mark.parametrize("kind", ZOO)
def test_train_export_and_run_in_llama_cpp(kind, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = build_tiny_arch(kind, tmp_path / "base")
    assert json.loads((model / "config.json").read_text())["model_type"] == ZOO_MODEL_TYPE[kind]
    assert (model / "tokenizer.model").is_file() == (kind not in ("llama-bpe", "qwen2", "qwen3"))
    ckpt = _train(model, tmp_path / "run")
    out = tmp_path / "out"
    if ARCHITECTURES[ZOO_MODEL_TYPE[kind]].gguf_tied_head_only:
        # llama.cpp's gemma/gemma2 have no output tensor: a folded soul cannot go in a GGUF. Refused
        # before any work; the HF export of the same checkpoint is exact; a control run exports.
        assert _export(ckpt, out, "f32,q8_0") == 2
        assert "take their output matrix from the input embedding" in capsys.readouterr().err
        assert not out.exists()
        assert _export(ckpt, out, "") == 0
        tok = AutoTokenizer.from_pretrained(out / "hf")
        _check_hf_equals_wrapper(ckpt, out / "hf", tok)
        ckpt = _train(model, tmp_path / "control", "--no-soul")
        out = tmp_path / "out_control"
    assert _export(ckpt, out, "f32,q8_0") == 0
    names = sorted(p.name for p in out.iterdir())
    ggufs = [n for n in names if n.endswith(".gguf")]
    assert [n for n in names if n not in ggufs] == [
        "Modelfile",
        "README.md",
        "export_report.json",
        "hf",
    ]
    assert sorted(n.rsplit("-", 1)[-1] for n in ggufs) == ["f32.gguf", "q8_0.gguf"], names
    tok = AutoTokenizer.from_pretrained(out / "hf")
    hf = _check_hf_equals_wrapper(ckpt, out / "hf", tok)
    _check_llama_cpp_equals_hf(out, hf, tok)
