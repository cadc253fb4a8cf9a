"""``agiasi eval --compare A,B`` without ``--task``: each model's held-out perplexity on the
same text, one model at a time; every row is what ``agiasi eval MODEL`` alone reports, the
ratio is to the first, and the report file holds the same rows."""

from __future__ import annotations

import json

import pytest

from agiasi.cli import main
from agiasi.shipped import tiny_model_path

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


def test_each_row_is_the_single_model_figure(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    from agiasi.eval.entry import format_perplexities
    from agiasi.gguf.writer import write_gguf

    hf = str(tiny_model_path())
    gguf = str(write_gguf(tiny_model_path(), tmp_path / "f32.gguf", "f32"))
    report = tmp_path / "ppl.json"
    args = ["eval", "--compare", f"{hf},{gguf}", "--max-tokens", "1024", "--report", str(report)]
    assert main([*args, "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    singles = []
    for m in (hf, gguf):
        assert main(["eval", m, "--max-tokens", "1024", "--json"]) == 0
        singles.append(json.loads(capsys.readouterr().out))
    assert both["rows"] == singles
    assert json.loads(report.read_text(encoding="utf-8")) == both
    # the F32 GGUF computes what the HF model computes: the same tokens, a ratio of 1 within
    # float32 rounding of a 1,024-token mean log-likelihood
    assert singles[0]["tokens"] == singles[1]["tokens"]
    assert singles[1]["perplexity"] / singles[0]["perplexity"] == pytest.approx(1, abs=1e-3)
    table = format_perplexities(both)
    assert "× first" in table and "1.000" in table
