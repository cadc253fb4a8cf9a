"""Messages that name the real cause: conversations dropped by ``--max-length``, a deleted
``best.json``, a broken chat template (not a role complaint), a base folder whose name has a
space (its GGUF names are made safe instead of refused)."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from agiasi.cli import main
from agiasi.data.tokenize import tokenize_records
from agiasi.errors import AgiasiError
from tests.helpers import cli_args

FAST = ["--quantization", "none", "--max-length", "32", "--no-progress"]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_conversations_cut_before_their_answer_are_counted(tiny_phi3_tok):
    tok = AutoTokenizer.from_pretrained(tiny_phi3_tok)
    long_q = "長い質問です。" * 40
    said: list[str] = []
    recs = [_chat("短い", "はい"), _chat(long_q, "はい"), _chat(long_q, "いいえ")]
    out = tokenize_records(recs, tok, 32, log=said.append)
    assert len(out) == 1
    assert any("2 conversation(s) dropped" in s and "--max-length 32" in s for s in said), said
    with pytest.raises(AgiasiError, match="no conversation left to train: all 2 conversation"):
        tokenize_records(recs[1:], tok, 32)


@pytest.mark.slow
def test_step_best_without_best_json_says_it_is_missing(tiny_phi3_tok, tmp_path, capsys):
    run = tmp_path / "run"
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(["吾輩は猫である。名前はまだ無い。"] * 4), encoding="utf-8")
    args = cli_args("train", base_model=tiny_phi3_tok, output_dir=run, max_steps=2, dataset=data)
    assert main([*args, *FAST, "--save-steps", "2", "--eval-split", "0.5"]) == 0
    (run / "best.json").unlink()
    assert main(["export", str(run), "--step", "best", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "was trained with validation but its best.json is missing" in err


def test_a_broken_template_is_named_not_a_role(tiny_phi3_tok, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_phi3_tok, model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ messages[0]['content'] | no_such_filter }}"
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (model / extra).unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(model)
    with pytest.raises(AgiasiError, match="the template itself is broken") as e:
        tokenize_records([_chat("q", "a")], tok, 64)
    assert "no_such_filter" in str(e.value) and "is not one this" not in str(e.value)


@pytest.mark.slow
def test_a_base_folder_with_a_space_exports_its_gguf(tiny_phi3_tok, tmp_path):
    base = tmp_path / "my models" / "tiny phi3"
    shutil.copytree(tiny_phi3_tok, base)
    run = tmp_path / "run"
    args = cli_args("train", base_model=base, output_dir=run, max_steps=1)
    assert main([*args, *FAST, "--save-steps", "1"]) == 0
    out = tmp_path / "export"
    rc = main(["export", str(run / "step_1"), "--out", str(out), "--gguf", "f32", "--no-measure"])
    assert rc == 0
    assert (out / "tiny-phi3-agiasi-f32.gguf").is_file()
    assert "FROM ./tiny-phi3-agiasi-f32.gguf" in (out / "Modelfile").read_text()
