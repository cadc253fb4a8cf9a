"""Config fields explain, type-check and bound themselves; flags and YAML share one converter."""

from dataclasses import dataclass
from typing import Literal

import pytest

from agiasi.errors import AgiasiError
from agiasi.options import check, coerce, converter, option


@dataclass
class Demo:
    rate: float = option(1e-3, "a rate", gt=0.0)
    steps: int = option(10, "steps", ge=1)
    on: bool = option(True, "a switch")
    kind: Literal["a", "b"] = option("a", "a choice")
    names: list[str] | None = option(None, "names")


@pytest.mark.parametrize(
    "name, value, want",
    [
        ("rate", "2e-4", 2e-4),  # YAML 1.1 reads this as a string
        ("steps", "1e3", 1000),
        ("steps", 12.0, 12),
        ("on", "false", False),
        ("on", "yes", True),
        ("kind", "b", "b"),
        ("names", "q_proj, v_proj", ["q_proj", "v_proj"]),
        ("names", ["o_proj"], ["o_proj"]),
        ("names", None, None),
    ],
)
def test_file_values_convert_like_flags(name, value, want):
    assert coerce(Demo, name, value, "config file") == want


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("steps", 1.5, "steps: 1.5 is not valid (expected an integer)"),
        ("on", "maybe", "expected true or false"),
        ("kind", "c", "choose one of a, b"),
        ("rate", True, "expected a number"),
        ("steps", None, "steps cannot be empty"),
    ],
)
def test_bad_file_values_name_the_key(name, value, message):
    with pytest.raises(AgiasiError, match=message.replace("(", r"\(").replace(")", r"\)")):
        coerce(Demo, name, value, "config file")


def test_check_rejects_non_finite_and_out_of_range_with_the_flag():
    with pytest.raises(AgiasiError, match="--rate must be a finite number"):
        check(Demo(rate=float("nan")))
    with pytest.raises(AgiasiError, match="--rate must be positive, got -1"):
        check(Demo(rate=-1.0))
    with pytest.raises(AgiasiError, match="--steps must be at least 1, got 0"):
        check(Demo(steps=0))
    cfg = Demo(rate="3e-4", steps="5")  # the Python API gets the same conversion
    check(cfg)
    assert cfg.rate == 3e-4 and cfg.steps == 5


def test_an_unknown_field_type_fails_loudly():
    with pytest.raises(TypeError, match="has no converter"):
        converter(dict[str, int])
