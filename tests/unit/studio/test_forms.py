"""The training form is generated from TrainConfig: every flag shows, the page's values become
the same config the CLI builds from the same flags, and its errors are the CLI's lines."""

from __future__ import annotations

import dataclasses

import pytest

from agiasi.cli import _read_yaml, build_config, build_parser
from agiasi.errors import AgiasiError
from agiasi.studio.forms import HIDDEN, config_from_form, flags_of, form_schema, yaml_of
from agiasi.train.config import TrainConfig


def test_every_field_of_train_config_is_on_the_form_once():
    shown = [f["name"] for g in form_schema(TrainConfig) for f in g["fields"]]
    assert sorted(shown) == sorted(
        f.name for f in dataclasses.fields(TrainConfig) if f.name not in HIDDEN
    )
    assert len(shown) == len(set(shown))
    by_name = {f["name"]: f for g in form_schema(TrainConfig) for f in g["fields"]}
    assert by_name["method"]["choices"] == ["sft", "dpo", "orpo"]
    assert (
        by_name["learning_rate"]["kind"] == "float" and by_name["learning_rate"]["default"] == 2e-4
    )
    assert "positive" in by_name["learning_rate"]["bounds"]
    assert by_name["packing"]["kind"] == "bool" and by_name["base_model"]["required"]


VALUES = {
    "base_model": "m",
    "max_steps": "12",
    "learning_rate": "1e-3",
    "packing": True,
    "soul": False,
    "lora_targets": "qkv_proj,o_proj",
    "method": "dpo",
    "beta": "0.25",
    "dataset": "pairs.jsonl",
    "gradient_checkpointing": True,  # the default: not in the command
}


def test_form_values_give_the_configs_the_cli_builds_from_the_shown_flags_and_yaml(tmp_path):
    with pytest.raises(AgiasiError, match="leave --packing off"):  # the CLI's own check
        config_from_form(TrainConfig, VALUES)
    cfg = config_from_form(TrainConfig, {**VALUES, "packing": False})
    flags = flags_of(cfg)
    assert "--gradient-checkpointing" not in flags and "--no-soul" in flags
    args = build_parser().parse_args(["train", *flags])
    assert build_config(TrainConfig, args) == cfg
    f = tmp_path / "c.yaml"
    f.write_text(yaml_of(cfg), encoding="utf-8")
    assert (
        build_config(TrainConfig, build_parser().parse_args(["train"]), _read_yaml(str(f))) == cfg
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"base_model": "m", "learning_rate": "-1"}, "--learning-rate must be positive"),
        ({"base_model": "m", "max_steps": "1.5"}, "argument --max-steps: '1.5' is not valid"),
        ({"base_model": "m", "method": "ppo"}, "choose one of sft, dpo, orpo"),
        ({"max_steps": "3"}, "missing required option(s): --base-model"),
        ({"base_model": "m", "eval_split": "1.5"}, "--eval-split must be at least 0 and less"),
        ({"base_model": "m", "learning_rate": "-1e-3"}, "--learning-rate must be positive"),
    ],
)
def test_errors_are_the_cli_lines(values, message, capsys):
    """The page's message for a value is the line `agiasi train` prints for the same flag."""
    from agiasi.cli import main

    with pytest.raises(AgiasiError) as e:
        config_from_form(TrainConfig, values)
    assert message in str(e.value)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    assert main(["train", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"agiasi: error: {e.value}"
