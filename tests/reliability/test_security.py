"""Security: tensors-only loading, remote code only by flag, no writes outside the output."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from agiasi.cli import main
from tests.helpers import make_checkpoint

SRC = Path(__file__).resolve().parents[2] / "src" / "agiasi"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _calls(tree: ast.AST, attr: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name == attr:
                yield node


def test_every_torch_load_is_weights_only():
    found = 0
    for path in [*SRC.rglob("*.py"), *SCRIPTS.rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree, "load"):
            f = call.func
            if isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "torch":
                found += 1
                kw = {k.arg: k.value for k in call.keywords}
                assert "weights_only" in kw, f"{path}:{call.lineno} torch.load without weights_only"
                assert (
                    isinstance(kw["weights_only"], ast.Constant)
                    and kw["weights_only"].value is True
                )
    assert found >= 1  # the scan really sees our loader


def test_trust_remote_code_is_never_hardcoded_true():
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), (
                    f"{path}:{node.value.lineno} hard-codes trust_remote_code=True"
                )


CUSTOM_CONFIG = """
from transformers import LlamaConfig
open({marker!r}, "a").write("config code ran\\n")
class CustomConfig(LlamaConfig):
    model_type = "agiasi_custom"
"""
CUSTOM_MODEL = """
from transformers import LlamaForCausalLM
from .configuration_custom import CustomConfig
class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def make_remote_code_model(tmp_path: Path, base: Path) -> tuple[Path, Path]:
    """A copy of ``base`` whose config.json asks for its own Python code (which leaves a marker
    file when it runs)."""
    d = tmp_path / "custom"
    shutil.copytree(base, d)
    marker = tmp_path / "remote_code_ran"
    (d / "configuration_custom.py").write_text(CUSTOM_CONFIG.format(marker=str(marker)))
    (d / "modeling_custom.py").write_text(CUSTOM_MODEL)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(
        model_type="agiasi_custom",
        architectures=["CustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (d / "config.json").write_text(json.dumps(cfg))
    return d, marker


@pytest.fixture()
def remote_code_model(tmp_path, tiny_llama_tied):
    return make_remote_code_model(tmp_path, tiny_llama_tied)


def test_remote_code_refused_without_the_flag(remote_code_model, capsys):
    d, marker = remote_code_model
    assert main(["info", str(d)]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture" in err and "--trust-remote-code" in err
    assert not marker.exists(), "the model's own code ran without --trust-remote-code"


def test_remote_code_runs_with_the_flag(remote_code_model, capsys):
    d, marker = remote_code_model
    rc = main(["info", str(d), "--trust-remote-code", "--lora-targets", "q_proj,v_proj"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["architecture"] == "CustomForCausalLM"
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.llamacpp
def test_paths_in_a_checkpoint_cannot_write_outside_the_output(tiny_phi3_tok, tmp_path):
    ckpt = make_checkpoint(tiny_phi3_tok, tmp_path / "run" / "step_10")
    # a hostile soul.json: its base model path climbs out and names a file elsewhere
    sneaky = tmp_path / "elsewhere"
    sneaky.mkdir()
    link = tmp_path / "run" / "step_10" / ".." / ".." / tiny_phi3_tok.name
    shutil.copytree(tiny_phi3_tok, tmp_path / tiny_phi3_tok.name)
    meta = json.loads((ckpt / "soul.json").read_text())
    meta["base_model"] = str(link)
    meta["model"]["base_model"] = str(link)
    (ckpt / "soul.json").write_text(json.dumps(meta))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--out", str(out), "--gguf", "f32", "--no-measure"]) == 0
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == out or out in p.parents for p in new), sorted(map(str, new))
    assert not any(sneaky.iterdir())
