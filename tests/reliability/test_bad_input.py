"""Bad input table: each case gives one clear line, a non-zero exit, and writes nothing.

Run in-process through ``agiasi.cli.main`` (what the console script calls); one case also runs
as a real subprocess to show there is no traceback, and that ``--debug`` brings it back.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agiasi.cli import main
from tests.helpers import build_tiny_llama, build_tiny_phi3_with_tokenizer, make_checkpoint

pytestmark = pytest.mark.slow
FAST = [
    "--quantization",
    "none",
    "--max-length",
    "32",
    "--max-steps",
    "2",
    "--save-steps",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def env(tiny_phi3_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    ckpt = make_checkpoint(tiny_phi3_tok, root / "ckpts" / "step_10")
    other = build_tiny_phi3_with_tokenizer(root / "other", hidden=32)
    assert (
        main(
            [
                "train",
                "--base-model",
                str(tiny_phi3_tok),
                "--output-dir",
                str(root / "trained"),
                *FAST,
            ]
        )
        == 0
    )
    return {
        "model": tiny_phi3_tok,
        "ckpt": ckpt,
        "other": other,
        "root": root,
        "trained": root / "trained" / "step_2",
    }


def _copy_ckpt(env, tmp_path) -> Path:
    dst = tmp_path / "ck" / "step_10"
    shutil.copytree(env["ckpt"], dst)
    return dst


def _data(tmp_path, content: bytes | str, name="d.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def _train(env, tmp_path, *extra):
    return [
        "train",
        "--base-model",
        str(env["model"]),
        "--output-dir",
        str(tmp_path / "run"),
        *FAST,
        *extra,
    ]


def case_model_missing(env, tmp_path):
    return [
        "train",
        "--base-model",
        str(tmp_path / "nope"),
        "--output-dir",
        str(tmp_path / "run"),
        *FAST,
    ]


def case_model_not_a_model(env, tmp_path):
    (tmp_path / "empty").mkdir()
    return [
        "train",
        "--base-model",
        str(tmp_path / "empty"),
        "--output-dir",
        str(tmp_path / "run"),
        *FAST,
    ]


def case_model_is_a_file(env, tmp_path):
    return [
        "train",
        "--base-model",
        str(_data(tmp_path, "x", "m.bin")),
        "--output-dir",
        str(tmp_path / "run"),
        *FAST,
    ]


def case_unsupported_arch(env, tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "bert")
    return ["info", str(tmp_path / "bert")]


def case_dataset_missing(env, tmp_path):
    return _train(env, tmp_path, "--dataset", str(tmp_path / "none.jsonl"))


def case_dataset_empty(env, tmp_path):
    return _train(env, tmp_path, "--dataset", str(_data(tmp_path, "")))


def case_dataset_binary(env, tmp_path):
    return _train(env, tmp_path, "--dataset", str(_data(tmp_path, b"\x00\x01\x02PK\x03", "d.txt")))


def case_jsonl_malformed(env, tmp_path):
    return _train(
        env,
        tmp_path,
        "--dataset",
        str(_data(tmp_path, '{"text": "一"}\n{"text": "二"}\n{"text": 三}\n')),
    )


def case_messages_without_assistant(env, tmp_path):
    rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "質問"}]}
    return _train(
        env, tmp_path, "--dataset", str(_data(tmp_path, json.dumps(rec, ensure_ascii=False)))
    )


def case_text_shorter_than_a_token(env, tmp_path):
    return _train(env, tmp_path, "--dataset", str(_data(tmp_path, '{"text": ""}\n')))


def case_max_steps_zero(env, tmp_path):
    return _train(env, tmp_path, "--max-steps", "0")


def case_negative_lr(env, tmp_path):
    return _train(env, tmp_path, "--learning-rate", "-0.001")


def case_batch_size_zero(env, tmp_path):
    return _train(env, tmp_path, "--batch-size", "0")


def case_max_length_above_model_limit(env, tmp_path):
    return _train(env, tmp_path, "--max-length", "100000")


def case_resume_other_base(env, tmp_path):
    return [
        "train",
        "--base-model",
        str(env["other"]),
        "--output-dir",
        str(tmp_path / "run"),
        "--resume",
        str(env["trained"]),
        *FAST,
    ]


def case_export_other_hidden(env, tmp_path):
    return [
        "export",
        str(env["ckpt"]),
        "--out",
        str(tmp_path / "out"),
        "--base-model",
        str(env["other"]),
    ]


def case_resume_missing_folder(env, tmp_path):
    return _train(env, tmp_path, "--resume", str(tmp_path / "step_99"))


def case_pickled_soul(env, tmp_path):
    ck = _copy_ckpt(env, tmp_path)
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save(
        {"alpha": torch.tensor(0.0), "so8_rotation": {}, "step": 1, "x": Evil()}, ck / "soul.pt"
    )
    return ["export", str(ck), "--out", str(tmp_path / "out")]


def case_adapter_missing_keys(env, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = _copy_ckpt(env, tmp_path)
    sd = load_file(ck / "adapter_model.safetensors")
    sd.pop(sorted(sd)[0])
    save_file(sd, ck / "adapter_model.safetensors")
    return ["eval", str(ck), "--max-tokens", "64"]


def case_export_nonempty_without_force(env, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    return ["export", str(env["ckpt"]), "--out", str(tmp_path / "out")]


def case_nan_loss(env, tmp_path):
    return _train(
        env,
        tmp_path,
        "--learning-rate",
        "1e30",
        "--max-grad-norm",
        "0",
        "--max-steps",
        "30",
        "--save-steps",
        "1000",
    )


def case_hidden_not_divisible_by_8(env, tmp_path):
    build_tiny_llama(tmp_path / "odd", hidden=36, heads=2)
    return ["info", str(tmp_path / "odd")]


def case_gguf_type_unknown(env, tmp_path):
    return ["export", str(env["ckpt"]), "--out", str(tmp_path / "out"), "--gguf", "q4_k_m,q2_xyz"]


def case_missing_tokenizer_model(env, tmp_path):
    notok = tmp_path / "notok"
    shutil.copytree(env["model"], notok)
    (notok / "tokenizer.model").unlink()
    return ["export", str(env["ckpt"]), "--out", str(tmp_path / "out"), "--base-model", str(notok)]


def case_partial_safetensors(env, tmp_path):
    part = tmp_path / "partial"
    shutil.copytree(env["model"], part)
    f = part / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return ["train", "--base-model", str(part), "--output-dir", str(tmp_path / "run"), *FAST]


def case_config_file_missing(env, tmp_path):
    return ["train", "--config", str(tmp_path / "none.yaml")]


def case_config_unknown_key(env, tmp_path):
    return ["train", "--config", str(_data(tmp_path, "base-model: x\nlearning_rat: 1\n", "c.yaml"))]


def case_lora_target_matches_nothing(env, tmp_path):
    return _train(env, tmp_path, "--lora-targets", "q_proj,v_proj")


def case_export_not_a_checkpoint(env, tmp_path):
    return ["export", str(env["model"]), "--out", str(tmp_path / "out")]


def case_eval_missing_model(env, tmp_path):
    return ["eval", str(tmp_path / "model.gguf")]


def case_merge_base_nf4_for_fp_checkpoint(env, tmp_path):
    return ["export", str(env["ckpt"]), "--out", str(tmp_path / "out"), "--merge-base", "nf4"]


CASES = [
    (case_model_missing, "base model not found"),
    (case_model_not_a_model, "is not a model folder: it has no config.json"),
    (case_model_is_a_file, "is a file; pass the model folder"),
    (case_unsupported_arch, "unsupported architecture 'bert'"),
    (case_dataset_missing, "dataset not found"),
    (case_dataset_empty, "the dataset is empty"),
    (case_dataset_binary, "looks binary"),
    (case_jsonl_malformed, "line 3 is not valid JSON"),
    (case_messages_without_assistant, 'line 1: "messages" has no assistant turn'),
    (case_text_shorter_than_a_token, "tokenizes to fewer than 2 tokens"),
    (case_max_steps_zero, "--max-steps must be at least 1"),
    (case_negative_lr, "--learning-rate must be positive"),
    (case_batch_size_zero, "--batch-size must be at least 1"),
    (case_max_length_above_model_limit, "exceeds the model's limit of 256 positions"),
    (case_resume_other_base, "was trained on another base model"),
    (case_export_other_hidden, "was trained on another base model"),
    (case_resume_missing_folder, "cannot resume from"),
    (case_pickled_soul, "refusing to load"),
    (case_adapter_missing_keys, "is missing 1 LoRA tensor(s)"),
    (case_export_nonempty_without_force, "already exists; pass --force"),
    (case_nan_loss, "loss became non-finite (nan/inf) at step"),
    (case_hidden_not_divisible_by_8, "needs a hidden size divisible by 8, got 36"),
    (case_gguf_type_unknown, "unknown GGUF type(s) q2_xyz"),
    (case_missing_tokenizer_model, "has no tokenizer.model"),
    (case_partial_safetensors, "an interrupted download?"),
    (case_config_file_missing, "config file not found"),
    (case_config_unknown_key, "unknown key 'learning_rat'"),
    (case_lora_target_matches_nothing, "match no module"),
    (case_export_not_a_checkpoint, "is not an agiasi checkpoint"),
    (case_eval_missing_model, "model not found"),
    (case_merge_base_nf4_for_fp_checkpoint, "--merge-base nf4 only makes sense"),
]


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("make, message", CASES, ids=[c[0].__name__[5:] for c in CASES])
def test_bad_input(env, tmp_path, capsys, make, message):
    argv = make(env, tmp_path)
    before = _snapshot(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.startswith("agiasi: error:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
    after = _snapshot(tmp_path)
    written = {p for p in after - before if not p.startswith("run/") or "step_" in p}
    # nothing half-written: no step folder, no export folder, no temp leftovers
    assert not any("step_" in p or p.startswith(("out", ".")) for p in written), written
    if make is case_pickled_soul:
        assert not (tmp_path / "executed").exists()


def test_warmup_plus_anneal_beyond_max_steps_is_allowed_but_warned(env, tmp_path, capsys):
    rc = main(_train(env, tmp_path, "--warmup-steps", "5", "--annealing-steps", "10"))
    err = capsys.readouterr().err
    assert rc == 0
    assert "warning: warmup (5) + annealing (10) > max steps (2)" in err


def test_few_steps_at_the_open_gate_are_warned(env, tmp_path, capsys):
    """Only the note's residual mix scales the logits; the default convex mix needs no warning."""
    steps = ("--warmup-steps", "0", "--annealing-steps", "1")
    rc = main(_train(env, tmp_path, *steps, "--soul-mix", "residual"))
    err = capsys.readouterr().err
    assert rc == 0
    assert "warning: only 1 step(s) at α = 1.618 after the anneal" in err
    assert "scales the logits by ≈ 1.83" in err
    assert main(_train(env, tmp_path / "convex", *steps)) == 0
    assert "step(s) at α" not in capsys.readouterr().err
    ctrl = _train(
        env, tmp_path / "ctrl", "--warmup-steps", "0", "--annealing-steps", "1", "--no-soul"
    )
    assert main(ctrl) == 0
    assert "step(s) at α" not in capsys.readouterr().err


def test_real_process_prints_one_line_and_debug_shows_traceback(tmp_path):
    cmd = [sys.executable, "-m", "agiasi", "train", "--base-model", str(tmp_path / "nope")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"agiasi: error: base model not found: {str(tmp_path / 'nope')!r} does not exist"
    ]
    dbg = subprocess.run([*cmd, "--debug"], capture_output=True, text=True)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


def test_disk_full_while_saving_leaves_no_step_folder(env, tmp_path, capsys, monkeypatch):
    import agiasi.checkpoint.step_folder as ck

    real_save = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("soul.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full)
    rc = main(_train(env, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and "disk full while writing" in err
    assert not [p for p in (tmp_path / "run").iterdir() if "step_" in p.name]
