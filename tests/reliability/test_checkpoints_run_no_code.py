"""Checkpoints and models never run code or write through links: remote code only behind the flag,
Modelfile values that could add directives, links in a run folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agiasi.cli import main
from agiasi.errors import AgiasiError
from tests.helpers import make_checkpoint
from tests.reliability.common import last_error, one_error, snapshot, train
from tests.reliability.test_security import make_remote_code_model

pytestmark = pytest.mark.slow


@pytest.fixture()
def hostile_checkpoint(tmp_path, tiny_llama_tied):
    """A step folder whose soul.json asks for remote code and points at a base with its own."""
    base, marker = make_remote_code_model(tmp_path, tiny_llama_tied)
    ckpt = make_checkpoint(tiny_llama_tied, tmp_path / "ck" / "step_10")
    meta = json.loads((ckpt / "soul.json").read_text())
    meta["base_model"] = meta["model"]["base_model"] = str(base)
    meta["model"]["trust_remote_code"] = True
    (ckpt / "soul.json").write_text(json.dumps(meta))
    return ckpt, marker


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "{ck}", "--max-tokens", "64"],
        ["export", "{ck}", "--out", "{tmp}/out", "--gguf", ""],
        ["generate", "{ck}", "--prompt", "日本", "--max-new-tokens", "2"],
    ],
    ids=["eval", "export", "generate"],
)
def test_a_checkpoint_cannot_switch_remote_code_on(hostile_checkpoint, tmp_path, capsys, command):
    ckpt, marker = hostile_checkpoint
    argv = [a.replace("{ck}", str(ckpt)).replace("{tmp}", str(tmp_path)) for a in command]
    line = one_error(capsys, main(argv))
    assert "runs its own code" in line and "--trust-remote-code" in line
    assert not marker.exists(), "the base model's code ran on the checkpoint's word"
    assert not (tmp_path / "out").exists()


def test_from_checkpoint_cannot_switch_remote_code_on(hostile_checkpoint):
    from agiasi import AGIASI_SO8T_Wrapper

    ckpt, marker = hostile_checkpoint
    with pytest.raises(AgiasiError, match="trust_remote_code=True in Python"):
        AGIASI_SO8T_Wrapper.from_checkpoint(ckpt, device="cpu")
    assert not marker.exists()


def test_a_checkpoint_on_a_remote_code_base_is_refused_without_asking(hostile_checkpoint, capsys):
    """Even when soul.json does not ask, the base's own code needs the user's flag."""
    ckpt, marker = hostile_checkpoint
    meta = json.loads((ckpt / "soul.json").read_text())
    meta["model"]["trust_remote_code"] = False
    (ckpt / "soul.json").write_text(json.dumps(meta))
    line = one_error(capsys, main(["eval", str(ckpt), "--max-tokens", "64"]))
    assert "--trust-remote-code" in line
    assert not marker.exists()


class _Tok:
    def __init__(self, eos):
        self.eos_token = eos

    def get_vocab(self):
        return {"<|end|>": 1, "<|endoftext|>": 2, "<|user|>": 3}


MODELFILE_CASES = {
    "eos_with_quote_and_newline": (
        '</s>"\nADAPTER /etc/passwd\nSYSTEM """x',
        "model.gguf",
        "the stop token '</s>\"\\nADAPTER /etc/passwd",
    ),
    "eos_with_backslash": ("a\\b", "model.gguf", "the stop token 'a\\\\b'"),
    "gguf_name_with_newline": (
        "<|endoftext|>",
        "m\nADAPTER x.gguf",
        "the GGUF file name './m\\nADAPTER",
    ),
    "gguf_name_with_space": (
        "<|endoftext|>",
        "my model.gguf",
        "the GGUF file name './my model.gguf'",
    ),
}


@pytest.mark.parametrize("case", MODELFILE_CASES)
def test_modelfile_refuses_values_that_could_add_directives(case):

    from agiasi.errors import AgiasiError
    from agiasi.export.files import modelfile

    eos, name, shown = MODELFILE_CASES[case]
    with pytest.raises(AgiasiError, match="cannot be written into an Ollama Modelfile safely") as e:
        modelfile(_Tok(eos), {"q8_0": Path(name)}, 256)
    assert shown in str(e.value)


def test_modelfile_of_plain_values_and_special_ids_in_the_vocabulary():
    from types import SimpleNamespace

    from agiasi.errors import AgiasiError
    from agiasi.export.checks import check_special_ids
    from agiasi.export.files import modelfile

    text = modelfile(_Tok("</s>"), {"q8_0": Path("m-q8_0.gguf")}, 256)
    lines = text.splitlines()
    assert "FROM ./m-q8_0.gguf" in lines and 'PARAMETER stop "</s>"' in lines
    directives = {x.split()[0] for x in lines if x and not x.startswith(("#", "{{", "<|"))}
    assert directives <= {"FROM", "TEMPLATE", "PARAMETER", "{{", '"""'}, directives
    shapes = {"lm_head.weight": (100, 8)}
    check_special_ids(
        SimpleNamespace(bos_token_id=1, eos_token_id=[2, 99], pad_token_id=None), shapes
    )
    with pytest.raises(
        AgiasiError, match=r"eos_token_id 100 is not a token id of its vocabulary \(0 … 99\)"
    ):
        check_special_ids(SimpleNamespace(eos_token_id=100), shapes)


@pytest.mark.parametrize("link", ["metrics.jsonl", "step_2", ".agiasi-train.pid"])
def test_links_in_a_run_folder_are_never_written_through(
    finished, tiny_phi3_tok, tmp_path, capsys, link
):

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    target = tmp_path / "elsewhere"
    if (run / link).is_dir():
        shutil.move(run / link, target)
    elif (run / link).exists():
        shutil.move(run / link, target)
    else:
        target.write_text("precious\n")
    (run / link).symlink_to(target, target_is_directory=target.is_dir())
    before = snapshot(target) if target.is_dir() else target.read_bytes()
    for extra in (("--resume", "auto"), ("--overwrite",)):
        assert train(tiny_phi3_tok, run, 3, *extra) == 2
        line = last_error(capsys)
        assert "is a symbolic link" in line and "never writes through" in line
    assert target.exists()
    assert (snapshot(target) if target.is_dir() else target.read_bytes()) == before


def test_control_token_text_in_plain_text_is_trained_as_text(tiny_phi3_tok):
    from transformers import AutoTokenizer

    from agiasi.data import tokenize_records

    tok = AutoTokenizer.from_pretrained(tiny_phi3_tok)
    (ex,) = tokenize_records([{"text": "本文<|user|>です"}], tok, 256)
    ids = [int(t) for t in ex.input_ids]
    assert tok.convert_tokens_to_ids("<|user|>") not in ids and ids[-1] == tok.eos_token_id
