"""`agiasi info` and the CLI's error contract (one line, non-zero exit, no traceback)."""

import json

import pytest

from agiasi.cli import main


def test_info_reports_targets_counts_and_phase(tiny_phi3, capsys):
    assert main(["info", str(tiny_phi3)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "Phi3ForCausalLM"
    assert info["hidden_size"] == 64
    assert info["lora_targets"] == {"qkv_proj": 2, "o_proj": 2}
    assert info["lora_parameters"] == 2 * 16 * ((64 + 192) + (64 + 64))
    assert info["soul_parameters"] == 8 * 28
    assert info["phase"] == "🔵 Stable"


def test_info_phi35_mini_shape_from_config_only(tmp_path, capsys):
    """Phi-3.5-mini's numbers from its config alone (meta device: no 7 GB of weights)."""
    from transformers import Phi3Config

    cfg = Phi3Config(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Phi3ForCausalLM"]
    cfg.save_pretrained(tmp_path / "phi35")
    assert main(["info", str(tmp_path / "phi35")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lora_parameters"] == 9_437_184  # qkv_proj + o_proj, r=16, 32 layers
    assert info["soul_parameters"] == 10_752  # 384 blocks x 28
    assert info["lora_targets"] == {"qkv_proj": 32, "o_proj": 32}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/no/such/model"], "base model not found"),
        (
            ["info", "{tiny}", "--rotation", "bogus"],
            "'bogus' is not valid (choose one of so8, full)",
        ),
        (["info", "{tiny}", "--lora-targets", "nothing_here"], "match no module"),
        (["info", "{tiny}", "--quantization", "int3"], "choose one of nf4, none"),
    ],
)
def test_cli_errors_are_one_clear_line(tiny_phi3, capsys, argv, message):
    argv = [a.replace("{tiny}", str(tiny_phi3)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_readme_lists_the_architecture_table():
    """The README's table is the code's table (architectures.py), row for row."""
    from pathlib import Path

    from agiasi.architectures import table_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert table_markdown() in readme


def test_every_train_flag_is_explained(capsys):
    import dataclasses

    from agiasi.train.loop import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        assert "--" + f.name.replace("_", "-") in text
    assert "[at least 1]" in text and "{convex,residual}" in text


def test_schedule_warning():
    from agiasi.train.loop import TrainConfig, schedule_warning

    def cfg(**kw):
        return TrainConfig(base_model="m", **kw)

    assert schedule_warning(cfg(max_steps=500, warmup_steps=50, annealing_steps=400)) is None
    short = schedule_warning(cfg(max_steps=10, warmup_steps=5, annealing_steps=10))
    assert short.startswith("warning: warmup (5) + annealing (10) > max steps (10)")
    few = cfg(max_steps=20, warmup_steps=5, annealing_steps=10, soul_mix="residual")
    assert "only 5 step(s) at α = 1.618" in schedule_warning(few)
    assert schedule_warning(cfg(max_steps=20, warmup_steps=5, annealing_steps=10)) is None
    assert (
        schedule_warning(cfg(max_steps=10, warmup_steps=5, annealing_steps=10, soul=False)) is None
    )
    learned = cfg(max_steps=10, warmup_steps=5, annealing_steps=10, alpha_mode="learned")
    assert schedule_warning(learned) is None


def test_no_import_cycles_between_the_stages():
    """export's stages → parity → eval (never back), and the checkpoint format never imports the
    model, not even for a type hint (``TYPE_CHECKING`` imports count)."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "agiasi"

    def imports(name: str) -> set[str]:
        tree = ast.parse((src / f"{name}.py").read_text(encoding="utf-8"))
        return {
            node.module.removeprefix("agiasi.")
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("agiasi.")
        }

    def under(found: set[str], prefix: str) -> bool:
        return any(m == prefix or m.startswith(prefix + ".") for m in found)

    assert not under(imports("eval/perplexity"), "export")
    assert not under(imports("export/parity"), "export.run")
    assert not under(imports("checkpoint/step_folder"), "model")
    for stage in ("hf", "measure", "quant"):
        assert not under(imports(f"export/{stage}"), "export.run")
    merge = imports("export/merge")
    assert not under(merge, "export.run") and not under(merge, "export.parity")


@pytest.mark.parametrize("value", ["two", "0", "-3"])
def test_a_malformed_world_size_is_one_clear_line(monkeypatch, tmp_path, capsys, value):
    """WORLD_SIZE comes from a launcher, or from a shell left set: refused by name before any
    work, not int()'s traceback."""
    monkeypatch.setenv("WORLD_SIZE", value)
    argv = ["train", "--base-model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"WORLD_SIZE='{value}' in the environment is not a whole number >= 1" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_out_of_memory_advice_follows_the_run():
    """Checkpointing off is the first rung (offloading needs it); a tied head is not told to
    move its embedding; an allocator message in other words still gives the advice."""
    import torch

    from agiasi.train.config import TrainConfig
    from agiasi.train.session import out_of_memory

    cfg = TrainConfig(base_model="m", gradient_checkpointing=False, max_length=2048)
    err = out_of_memory(cfg, torch.OutOfMemoryError("out of memory"), True, None)
    assert str(err) == (
        "the GPU ran out of memory. To need less: --gradient-checkpointing; a shorter "
        "--max-length (now 2048)."
    )


def test_gpu_out_of_memory_in_any_command_is_one_clear_line(tiny_phi3, monkeypatch, capsys):
    """Outside training (which names its own flags) a CUDA out-of-memory is still the user's
    situation, not an internal error: one line with what the allocator asked for."""
    import torch

    import agiasi.info
    from tests.helpers import CUDA_OOM

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(agiasi.info, "describe", no_room)
    assert main(["info", str(tiny_phi3)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "agiasi: error: the GPU ran out of memory (it asked for 1.50 GiB more, 10.75 GiB in use);"
    )
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err


def test_main_called_in_process_freezes_nothing_and_leaves_the_collector_on(tiny_phi3, capsys):
    """``main`` pauses the cyclic collector over its imports; only the console entry (a process
    that ends with the command) may also freeze what exists then — a caller that goes on (tests,
    scripts) would otherwise keep every garbage cycle of the command forever."""
    import gc

    from agiasi.process import gc_paused

    frozen = gc.get_freeze_count()
    assert main(["info", str(tiny_phi3)]) == 0
    assert gc.get_freeze_count() == frozen
    assert gc.isenabled()
    with gc_paused():
        with gc_paused(freeze=True):  # nested: the outer pause decides
            assert not gc.isenabled()
        assert not gc.isenabled()
        assert gc.get_freeze_count() == frozen
    assert gc.isenabled()
    try:
        with gc_paused(freeze=True):
            pass
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
