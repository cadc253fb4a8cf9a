"""Reliability, second round: a checkpoint never runs code, an export never eats what it reads,
a run never destroys another, and every value and file is checked — each with one clear line,
exit code 2, no traceback and no "internal error".

The tables at the bottom are the classes of bad input; the four defects have their own tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from agiasi.cli import main
from agiasi.errors import AgiasiError
from tests.helpers import cli_cmd, make_checkpoint, make_wrapper
from tests.reliability.test_security import make_remote_code_model

pytestmark = pytest.mark.slow
FAST = ["--quantization", "none", "--max-length", "32", "--save-steps", "2", "--no-progress"]


def one_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.startswith("agiasi: error:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    return lines[0]


def train_argv(model: Path, out: Path, steps: int = 2, *extra: str) -> list[str]:
    return [
        "train",
        "--base-model",
        str(model),
        "--output-dir",
        str(out),
        "--max-steps",
        str(steps),
        *FAST,
        *extra,
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_phi3_tok, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(tiny_phi3_tok, run)) == 0
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# --------------------------------------------------------------------------- defect 1


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


# --------------------------------------------------------------------------- defect 2


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


# --------------------------------------------------------------------------- defect 3


def test_a_new_run_over_a_finished_one_is_refused_and_touches_nothing(
    finished_run, tiny_phi3_tok, tmp_path, capsys
):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    line = one_error(capsys, main(train_argv(tiny_phi3_tok, run, 4)))
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    # a resumed run that fails at start-up (another dataset: refused) leaves the old run as it was
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    argv = train_argv(tiny_phi3_tok, run, 4, "--resume", "auto", "--dataset", str(bad))
    line = one_error(capsys, main(argv))
    assert "settings differ" in line and f"--dataset None → {str(bad)!r}" in line
    assert snapshot(run) == before


def test_overwrite_replaces_the_previous_run(finished_run, tiny_phi3_tok, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    assert main(train_argv(tiny_phi3_tok, run, 3, "--overwrite", "--save-steps", "3")) == 0
    assert "removed the previous run" in capsys.readouterr().err
    names = sorted(p.name for p in run.iterdir())
    assert "step_2" not in names and "step_3" in names and "notes.txt" in names
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_two_runs_in_one_folder_at_once(tiny_phi3_tok, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen(
        cli_cmd(
            "train",
            base_model=tiny_phi3_tok,
            output_dir=run,
            max_steps=100_000,
            quantization="none",
            max_length=32,
            save_steps=100_000,
            progress=False,
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        line = one_error(capsys, main(train_argv(tiny_phi3_tok, run, 2, "--resume", "auto")))
        assert f"in use by another `agiasi train` (pid {first.pid})" in line
    finally:
        first.kill()
        first.wait()
    assert not any(p.name.startswith("step_") for p in run.iterdir())
    # the killed holder's lock does not block the folder (the OS released it)
    assert main(train_argv(tiny_phi3_tok, run, 2, "--resume", "auto")) == 0


def test_a_failed_start_leaves_no_empty_folder(tiny_phi3_tok, tmp_path, capsys):
    run = tmp_path / "new_run"
    one_error(capsys, main(train_argv(tiny_phi3_tok, run, 2, "--dataset", str(tmp_path / "x"))))
    assert not run.exists()


# --------------------------------------------------------------------------- defect 4


def test_resume_past_max_steps_says_so(finished_run, tiny_phi3_tok, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    line = one_error(capsys, main(train_argv(tiny_phi3_tok, run, 1, "--resume", "auto")))
    assert "is at step 2, past --max-steps 1" in line
    assert main(train_argv(tiny_phi3_tok, run, 2, "--resume", "auto")) == 0
    assert "already at --max-steps 2; nothing to train" in capsys.readouterr().err
    assert snapshot(run) == before


# --------------------------------------------------------------------------- classes: tables


def _yaml(tmp_path: Path, model: Path, body: str) -> list[str]:
    p = tmp_path / "c.yaml"
    p.write_text(f"base-model: {model}\noutput-dir: {tmp_path / 'run'}\n" + body)
    return ["train", "--config", str(p), *FAST, "--max-steps", "2"]


def test_config_values_are_typed_like_flags(tiny_phi3_tok, tmp_path):
    """YAML 1.1 reads 2e-4 as a string and a quoted "false" as a string: both mean what the
    same flag would mean."""
    body = 'learning-rate: 2e-4\nsoul: "false"\nlora-targets: [qkv_proj, o_proj]\n'
    assert main(_yaml(tmp_path, tiny_phi3_tok, body)) == 0
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert cfg["learning_rate"] == 2e-4 and cfg["soul"] is False
    assert cfg["lora_targets"] == ["qkv_proj", "o_proj"]
    assert json.loads((tmp_path / "run" / "step_2" / "soul.json").read_text())["soul"] is None


YAML_CASES = [
    ("max-steps: abc\n", "max-steps: 'abc' is not valid (expected an integer"),
    ("lora-r: 1.5\n", "lora-r: 1.5 is not valid (expected an integer)"),
    ("soul: maybe\n", "soul: 'maybe' is not valid (expected true or false)"),
    ("rotation: so9\n", "rotation: 'so9' is not valid (choose one of so8, full)"),
    ("learning-rate: fast\n", "learning-rate: 'fast' is not valid"),
    ("learning-rate: .nan\n", "--learning-rate must be a finite number"),
    ("max-steps:\n", "max-steps cannot be empty"),
]


@pytest.mark.parametrize("body, message", YAML_CASES, ids=[c[0].split(":")[0] for c in YAML_CASES])
def test_bad_config_values(tiny_phi3_tok, tmp_path, capsys, body, message):
    assert message in one_error(capsys, main(_yaml(tmp_path, tiny_phi3_tok, body)))
    assert not (tmp_path / "run").exists()


def _chat(tmp_path: Path, turns: list[dict]) -> Path:
    good = {
        "messages": [{"role": "user", "content": "質問"}, {"role": "assistant", "content": "答"}]
    }
    p = tmp_path / "chat.jsonl"
    lines = [good, {"messages": turns}]
    p.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return p


@pytest.mark.parametrize("role", ["User", "hacker"])
def test_chat_roles_the_template_drops_are_errors(tiny_phi3_tok, tmp_path, capsys, role):
    data = _chat(
        tmp_path, [{"role": role, "content": "質問"}, {"role": "assistant", "content": "答"}]
    )
    argv = train_argv(tiny_phi3_tok, tmp_path / "run", 2, "--dataset", str(data))
    line = one_error(capsys, main(argv))
    assert f"line 2: role {role!r} is not one this tokenizer's chat template knows" in line


def test_empty_assistant_turns_are_warned(tiny_phi3_tok, tmp_path, capsys):
    data = _chat(
        tmp_path, [{"role": "user", "content": "質問"}, {"role": "assistant", "content": ""}]
    )
    assert main(train_argv(tiny_phi3_tok, tmp_path / "run", 2, "--dataset", str(data))) == 0
    assert "warning: empty assistant turn at" in capsys.readouterr().err


NUMBER_CASES = [
    (["train", "--soul-learning-rate", "-1"], "--soul-learning-rate must be positive, got -1.0"),
    (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (
        ["train", "--seed", "99999999999999999999"],
        "--seed must be at least 0 and at most 4294967295",
    ),
    (["train", "--lora-alpha", "-32"], "--lora-alpha must be positive, got -32"),
    (["train", "--alpha-target", "nan"], "--alpha-target must be a finite number, got nan"),
    (["train", "--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
    (["train", "--lora-dropout", "1"], "--lora-dropout must be at least 0 and less than 1"),
    (["train", "--ortho-weight", "-0.1"], "--ortho-weight must be at least 0"),
    (["train", "--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["train", "--max-steps", "2.5"], "--max-steps: '2.5' is not valid (expected an integer)"),
    (["train", "--device", "tpu"], "--device: 'tpu' is not a device"),
    (["export", "{ck}", "--out", "{tmp}/o", "--num-ctx", "0"], "--num-ctx must be at least 16"),
    (["export", "{ck}", "--out", "{tmp}/o", "--num-ctx", "-7"], "--num-ctx must be at least 16"),
    (["eval", "{ck}", "--max-tokens", "-100"], "--max-tokens must be at least 2, got -100"),
    (["eval", "{ck}", "--window", "1"], "--window must be at least 2, got 1"),
    (
        ["generate", "{ck}", "--prompt", "x", "--top-p", "2"],
        "--top-p must be positive and at most 1",
    ),
    (
        ["generate", "{ck}", "--prompt", "x", "--repetition-penalty", "0"],
        "--repetition-penalty must be positive",
    ),
    (
        ["generate", "{ck}", "--prompt", "x", "--temperature", "-1"],
        "--temperature must be at least 0",
    ),
    (["demo", "--max-steps", "2"], "--max-steps must be at least 4, got 2"),
    (["info", "{model}", "--lora-r", "0"], "--lora-r must be at least 1, got 0"),
]


@pytest.fixture(scope="module")
def ck(tiny_phi3_tok, tmp_path_factory):
    return make_checkpoint(tiny_phi3_tok, tmp_path_factory.mktemp("num") / "run" / "step_10")


@pytest.mark.parametrize(
    "argv, message", NUMBER_CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in NUMBER_CASES]
)
def test_every_number_is_validated(tiny_phi3_tok, ck, tmp_path, capsys, argv, message):
    argv = [
        a.replace("{ck}", str(ck))
        .replace("{tmp}", str(tmp_path))
        .replace("{model}", str(tiny_phi3_tok))
        for a in argv
    ]
    if argv[0] == "train":
        argv = train_argv(tiny_phi3_tok, tmp_path / "run", 2) + argv[1:]
    if argv[0] == "demo":
        argv += ["--out", str(tmp_path / "demo")]
    assert message in one_error(capsys, main(argv))
    assert not any(p.name in ("run", "o", "demo") for p in tmp_path.iterdir())


def _not_utf8(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    # neither UTF-8 nor Shift-JIS (0x85 leads no CP932 character): Shift-JIS itself is read
    p.write_bytes(b"\x85\x40" + "日本語".encode() + b"\n")
    return p


def file_cases(
    tmp_path: Path, model: Path, ck: Path, run: Path
) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "confdir").mkdir()
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(os.urandom(4096))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, noweights / f.name)
    afile = tmp_path / "afile"
    afile.write_text("x")
    badplot = tmp_path / "badplot"
    badplot.mkdir()
    (badplot / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg_bad = _not_utf8(tmp_path, "c.yaml")
    return {
        "config_is_a_folder": (["train", "--config", str(tmp_path / "confdir")], "is not a file"),
        "config_not_utf8": (["train", "--config", str(cfg_bad)], "is not UTF-8 text"),
        "dataset_not_utf8": (
            train_argv(model, tmp_path / "run", 2, "--dataset", str(_not_utf8(tmp_path, "d.txt"))),
            "is not UTF-8 text",
        ),
        "eval_text_not_utf8": (
            ["eval", str(ck), "--text", str(_not_utf8(tmp_path, "t.txt"))],
            "is not UTF-8",
        ),
        "deeply_nested_json": (
            train_argv(model, tmp_path / "run", 2, "--dataset", str(nested)),
            "line 1 is nested too deeply",
        ),
        "truncated_gguf": (["eval", str(trunc)], "truncated or damaged"),
        "fake_gguf": (["eval", str(fake)], "is not a GGUF file"),
        "hf_folder_without_weights": (["eval", str(noweights)], "could not load the model"),
        "train_output_is_a_file": (train_argv(model, afile, 2), "is a file; pass a folder"),
        "train_output_under_a_file": (
            train_argv(model, afile / "run", 2),
            "is a file, not a folder",
        ),
        "export_out_is_a_file": (["export", str(ck), "--out", str(afile), "--force"], "is a file"),
        "export_text_missing": (
            ["export", str(ck), "--out", str(tmp_path / "o"), "--text", str(tmp_path / "none.txt")],
            "evaluation text not found",
        ),
        "plot_rows_missing_a_field": (["plot", str(badplot)], "line 1 lacks task_loss"),
        "generate_gguf": (["generate", str(trunc), "--prompt", "x"], "run GGUFs in llama.cpp"),
    }


FILE_CASE_NAMES = [
    "config_is_a_folder",
    "config_not_utf8",
    "dataset_not_utf8",
    "eval_text_not_utf8",
    "deeply_nested_json",
    "truncated_gguf",
    "fake_gguf",
    "hf_folder_without_weights",
    "train_output_is_a_file",
    "train_output_under_a_file",
    "export_out_is_a_file",
    "export_text_missing",
    "plot_rows_missing_a_field",
    "generate_gguf",
]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", FILE_CASE_NAMES)
def test_every_file_problem_is_a_clear_error(
    tiny_phi3_tok, ck, finished_run, tmp_path, capsys, monkeypatch, name
):
    argv, message = file_cases(tmp_path, tiny_phi3_tok, ck, finished_run)[name]
    # found before any model loads: loading one here is a failure of the test
    import transformers

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    if name not in ("hf_folder_without_weights",):
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    assert message in one_error(capsys, main(argv))
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


def test_plot_into_a_folder_leaves_no_temp(finished_run, tmp_path, capsys):
    out = tmp_path / "plots"
    out.mkdir()
    assert main(["plot", str(finished_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phase_transition.png"]
    assert capsys.readouterr().out.strip() == str(out / "phase_transition.png")
    assert (out / "phase_transition.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- the Python API


def test_python_api_errors_are_agiasi_errors(tiny_phi3, finished_run):
    from agiasi import AGIASI_SO8T_Wrapper

    with pytest.raises(AgiasiError, match="needs a base model"):
        AGIASI_SO8T_Wrapper(123)
    with pytest.raises(AgiasiError, match="unknown option"):
        AGIASI_SO8T_Wrapper(str(tiny_phi3), quantisation="nf4")
    with pytest.raises(AgiasiError, match="'tpu' is not a device"):
        AGIASI_SO8T_Wrapper(str(tiny_phi3), device="tpu")
    with pytest.raises(AgiasiError, match="--lora-r must be at least 1"):
        AGIASI_SO8T_Wrapper(str(tiny_phi3), lora_r=0, quantization="none")
    w = make_wrapper(tiny_phi3)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    negative = ids.clone()
    negative[1, 3] = -1
    bad = [
        (dict(input_ids=ids.float()), "integer token ids"),
        (dict(input_ids=ids[0]), "must be (batch, sequence)"),
        (dict(input_ids=ids + 1000), "outside this model's vocabulary [0, 128)"),
        (dict(input_ids=negative), "token id -1 is outside"),
        (dict(input_ids=ids, labels=ids[:, :4]), "labels has shape (2, 4)"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 9, dtype=torch.long)), "attention_mask"),
    ]
    for kwargs, message in bad:
        with pytest.raises(
            AgiasiError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
        ):
            w(**kwargs)
    with pytest.raises(AgiasiError, match="outside this model's vocabulary"):
        w.generate(ids + 1000, max_new_tokens=2)
    with pytest.raises(AgiasiError, match="unknown option"):
        AGIASI_SO8T_Wrapper.from_checkpoint(finished_run / "step_2", device="cpu", bogus=1)
