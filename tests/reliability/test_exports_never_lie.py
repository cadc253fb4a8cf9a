"""An export never calls a bad model good and never eats what it reads: non-finite checkpoints and
figures, --force and concurrent exports, the trained base, the GGUF tokenizer's space prefix.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from agiasi.cli import main
from agiasi.errors import AgiasiError
from tests.reliability.common import (
    copy_run,
    last_error,
    one_error,
    snapshot,
    train,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "target",
    ["step", "run", "inside_step", "base", "symlink_to_run"],
)
def test_export_force_never_deletes_what_it_reads(
    finished_run, tiny_phi3_tok, tmp_path, capsys, target
):
    run = copy_run(finished_run, tmp_path)
    step = run / "step_2"
    base = tmp_path / "base"
    shutil.copytree(tiny_phi3_tok, base)
    meta = json.loads((step / "soul.json").read_text())
    meta["base_model"] = meta["model"]["base_model"] = str(base)
    (step / "soul.json").write_text(json.dumps(meta))
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    out = {
        "step": step,
        "run": run,
        "inside_step": step / "export",
        "base": base,
        "symlink_to_run": tmp_path / "link",
    }[target]
    before = snapshot(tmp_path)
    rc = main(["export", str(step), "--out", str(out), "--force", "--gguf", "", "--no-measure"])
    assert "overlaps" in one_error(capsys, rc)
    assert snapshot(tmp_path) == before


@pytest.fixture()
def poisoned(tiny_phi3_tok, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_phi3_tok, run, 2) == 0
    step = run / "step_2"
    adapter = load_file(step / "adapter_model.safetensors")
    key = sorted(adapter)[0]
    adapter[key] = adapter[key].clone()
    adapter[key][0, 0] = float("nan")
    save_file(adapter, step / "adapter_model.safetensors")
    return step, key


@pytest.mark.parametrize("measure", ["--measure", "--no-measure"])
def test_export_refuses_a_checkpoint_with_nan_before_writing(poisoned, tmp_path, capsys, measure):
    step, key = poisoned
    out = tmp_path / "export"
    rc = main(["export", str(step), "--out", str(out), "--gguf", "f32", measure])
    assert rc == 2
    line = last_error(capsys)
    assert "non-finite values (nan/inf)" in line and key in line
    assert not out.exists() and not any(p.name.startswith(".export") for p in tmp_path.iterdir())


def test_eval_of_a_nan_model_exits_non_zero(poisoned, capsys):
    step, _ = poisoned
    assert main(["eval", str(step), "--max-tokens", "64"]) == 2
    line = last_error(capsys)
    assert "perplexity of" in line and "is nan" in line and "not finite" in line


def test_nonfinite_figures_are_found_anywhere_in_a_report():
    from agiasi.export.files import failed_check, nonfinite_figures

    report = {"parity": {"hf": {"ppl": float("nan"), "top1": 1.0}, "q8": [0.1, float("inf")]}}
    assert nonfinite_figures(report) == ["parity.hf.ppl", "parity.q8.1"]
    assert nonfinite_figures({"a": {"b": 1.0, "c": "nan"}}) == []
    assert failed_check(report)[0] == "parity.hf.ppl"
    ok = {"parity": {"gguf q8_0 vs hf": {"top1": 1.0, "tokens_equal": True}}}
    assert failed_check(ok) is None
    ok["parity"]["gguf q8_0 vs hf"]["tokens_equal"] = False
    stage, why = failed_check(ok)
    assert stage == "gguf q8_0 vs hf" and "llama.cpp tokenizes differently" in why


def test_export_force_replaces_only_an_earlier_export(finished, tmp_path, capsys):
    step = finished / "step_2"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    (mine / "heldout.txt").write_text("日本語の文章です。" * 50)
    before = snapshot(mine)
    quick = ["--gguf", "", "--no-measure"]
    rc = main(["export", str(step), "--out", str(mine), "--force", *quick])
    assert rc == 2
    line = last_error(capsys)
    assert "--force replaces only an earlier export" in line and "notes.txt" in line
    assert snapshot(mine) == before
    # the --text file inside --out is refused before any work
    rc = main(["export", str(step), "--out", str(mine), "--force", "--gguf", "",
               "--text", str(mine / "heldout.txt")])  # fmt: skip
    assert rc == 2 and "overlaps the --text file" in last_error(capsys)
    assert snapshot(mine) == before
    # an earlier export is replaced
    out = tmp_path / "export"
    assert main(["export", str(step), "--out", str(out), *quick]) == 0
    assert main(["export", str(step), "--out", str(out), "--force", *quick]) == 0
    assert (out / "export_report.json").is_file() and (out / "hf").is_dir()
    # ... but not once the user put their own files in it
    (out / "mine.txt").write_text("x")
    assert main(["export", str(step), "--out", str(out), "--force", *quick]) == 2
    assert "mine.txt" in last_error(capsys) and (out / "mine.txt").exists()


def test_a_second_export_into_the_same_out_at_once_is_refused(finished, tmp_path, capsys):
    from filelock import FileLock

    out = tmp_path / "export"
    held = FileLock(str(tmp_path / ".export.export.lock"))  # what a running export holds
    held.acquire()
    try:
        rc = main(["export", str(finished / "step_2"), "--out", str(out), "--gguf", "",
                   "--no-measure"])  # fmt: skip
    finally:
        held.release()
    assert rc == 2
    assert "another `agiasi export` is writing" in last_error(capsys)
    assert not out.exists()


def _sharded_copy(src, dst):
    """The tiny base re-saved in two shards with an index (as hub models come)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    m.save_pretrained(dst, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    import shutil

    if (src / "tokenizer.model").exists():
        shutil.copy(src / "tokenizer.model", dst / "tokenizer.model")
    assert (dst / "model.safetensors.index.json").exists()
    return dst


def test_weights_follow_the_index_and_refuse_ambiguity(tiny_phi3_tok, tmp_path):
    from agiasi.weights import LazyWeights

    base = _sharded_copy(tiny_phi3_tok, tmp_path / "base")
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.down_proj.weight"
    want = LazyWeights(base).get(key).clone()
    # a stray old download beside the shards, holding another value for one layer
    save_file({key: torch.zeros_like(want)}, base / "old-download.safetensors")
    assert torch.equal(LazyWeights(base).get(key), want)
    # a tensor in two of the index's files is refused
    other = next(f for f in set(index.values()) if f != index[key])
    tensors = load_file(base / other)
    save_file({**tensors, key: torch.zeros_like(want)}, base / other)
    with pytest.raises(AgiasiError, match=f"tensor {key} is in both"):
        LazyWeights(base)
    # several files and no index: which are the model is not guessed
    loose = tmp_path / "loose"
    loose.mkdir()
    save_file({"a": torch.zeros(2)}, loose / "x.safetensors")
    save_file({"b": torch.zeros(2)}, loose / "y.safetensors")
    with pytest.raises(
        AgiasiError, match="2 .safetensors files .* but no model.safetensors.index.json"
    ):
        LazyWeights(loose)


def test_export_uses_the_trained_base_and_refuses_a_changed_one(tiny_phi3_tok, tmp_path, capsys):
    from safetensors.torch import load_file as read

    base = _sharded_copy(tiny_phi3_tok, tmp_path / "base")
    run = tmp_path / "run"
    assert train(base, run, 2) == 0
    step = run / "step_2"
    assert json.loads((step / "soul.json").read_text())["base_weights"]
    key = "model.layers.0.mlp.down_proj.weight"
    want = read(
        base / json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][key]
    )[key]
    # the issue's case: a stray file beside the shards silently replaced a layer (exit 0)
    save_file({key: torch.zeros_like(want)}, base / "old-download.safetensors")
    out = tmp_path / "export"
    assert main(["export", str(step), "--out", str(out), "--gguf", "", "--no-measure"]) == 0
    got = read(out / "hf" / "model.safetensors")[key]
    assert torch.equal(got.float(), want.float())
    capsys.readouterr()
    # a base whose weight files changed since training (re-saved in bf16) is refused
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(
        torch.bfloat16
    ).save_pretrained(base, max_shard_size="100KB")
    rc = main(["export", str(step), "--out", str(tmp_path / "e2"), "--gguf", "", "--no-measure"])
    assert rc == 2
    line = last_error(capsys)
    assert "is not the one checkpoint" in line and "weight files differ" in line
    assert not (tmp_path / "e2").exists()
    assert train(base, run, 4, "--resume", "auto") == 2
    assert "is not the one checkpoint" in last_error(capsys)


@pytest.mark.llamacpp
@pytest.mark.parametrize("prepend", ["first", "never"])
def test_gguf_space_prefix_follows_the_hf_tokenizer(tmp_path, prepend):
    """The issue's Gemma-2 case, on the shipped model: whether text gets a leading "▁" is the
    HF tokenizer's setting (Metaspace's prepend_scheme), and llama.cpp must tokenize alike."""
    import shutil

    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from agiasi.eval.models import GGUFModel
    from agiasi.gguf.writer import write_gguf
    from agiasi.shipped import tiny_model_path
    from agiasi.testing.zoo import JA_TEXTS

    hf = tmp_path / "hf"
    shutil.copytree(tiny_model_path(), hf)
    tj = json.loads((hf / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["prepend_scheme"] = prepend
    (hf / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    out = tmp_path / "m.gguf"
    write_gguf(hf, out, "f32")
    field = GGUFReader(str(out)).fields["tokenizer.ggml.add_space_prefix"]
    assert bool(field.parts[field.data[0]][0]) is (prepend == "first")
    tok = AutoTokenizer.from_pretrained(hf)
    g = GGUFModel(out, n_ctx=256)
    try:
        for text in [*JA_TEXTS, "Mew では、設定を変えます。"]:
            assert g.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"], text
    finally:
        g.close()


def test_an_export_folder_that_appears_meanwhile_is_not_replaced(
    finished, tmp_path, capsys, monkeypatch
):
    import agiasi.export.run as ex

    out = tmp_path / "export"
    real = ex.write_hf_folder

    def meanwhile(plan, hf_dir, folder, log):
        written = real(plan, hf_dir, folder, log)
        out.mkdir()
        (out / "someone_elses.txt").write_text("theirs")
        return written

    monkeypatch.setattr(ex, "write_hf_folder", meanwhile)
    rc = main(["export", str(finished / "step_2"), "--out", str(out), "--gguf", "", "--no-measure"])
    assert rc == 2 and "appeared while this export ran" in last_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["someone_elses.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
