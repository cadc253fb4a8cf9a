"""Config fields that explain, type-check and bound themselves.

Every stage's config is a dataclass whose fields are the command's flags (``max_steps`` ↔
``--max-steps``) and the keys of ``--config FILE.yaml``. :func:`option` puts the help text and
the valid range next to the field; the type annotation says the rest (``Literal[...]`` gives the
choices). One converter per type serves flags *and* YAML values, so ``2e-4`` or ``"false"`` in a
file means what it means on the command line, and :func:`check` rejects NaN, inf and
out-of-range numbers with the flag's name, for the CLI and the Python API alike.

Why not tyro / jsonargparse / ``HfArgumentParser``: we need flags > file > defaults with one
typed conversion shared by both, and every failure as one :class:`AgiasiError` line naming the
flag; each of those would need the same amount of wrapping, and the mapper stays ~150 lines.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from agiasi.errors import AgiasiError, shown

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    help: str = "",  # noqa: A002 - argparse's word
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default_factory: Callable[[], Any] | Any = MISSING,
) -> Any:
    """A dataclass field with its help text and bounds (checked by :func:`check`)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations (the modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls, include_extras=False)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def parse_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of names")
        return [v.strip() for v in value if v.strip()]
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    raise ValueError("expected a comma-separated list of names")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError("expected an integer")
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)  # "1e3" in a file
        except ValueError:
            raise ValueError("expected an integer") from None
        if not number.is_integer():
            raise ValueError("expected an integer") from None
        return int(number)


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        return float(value)
    except (ValueError, TypeError):
        raise ValueError("expected a number") from None


def converter(tp: Any) -> tuple[Callable[[Any], Any], tuple[str, ...] | None, bool]:
    """(convert, choices, optional) for a field type; an unknown type is a programming error."""
    tp, optional = _strip_optional(tp)
    if tp is bool:
        return parse_bool, None, optional
    if tp is int:
        return parse_int, None, optional
    if tp is float:
        return parse_float, None, optional
    if tp is str:
        return str, None, optional
    if get_origin(tp) is list and get_args(tp) == (str,):
        return parse_list, None, optional
    if get_origin(tp) is Literal:
        choices = tuple(str(c) for c in get_args(tp))

        def pick(value: Any) -> str:
            text = str(value)
            if text not in choices:
                raise ValueError(f"choose one of {', '.join(choices)}")
            return text

        return pick, choices, optional
    raise TypeError(f"option type {tp!r} has no converter: add one in agiasi.options")


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """A file's value converted by the same rules as the flag, or one clear error."""
    convert, _, optional = converter(field_types(cls)[name])
    if value is None:
        if optional:
            return None
        raise AgiasiError(f"{where}: {name.replace('_', '-')} cannot be empty")
    scalar = isinstance(value, (str, int, float, bool))
    if not (scalar or (isinstance(value, list) and convert is parse_list)):
        raise AgiasiError(
            f"{where}: {name.replace('_', '-')}: {shown(value)} is a {type(value).__name__}, "
            "not a value a flag takes"
        )
    try:
        return convert(value)
    except (ValueError, TypeError) as e:
        raise AgiasiError(
            f"{where}: {name.replace('_', '-')}: {shown(value)} is not valid ({str(e)[:160]})"
        ) from None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _describe_bound(meta: dict[str, Any]) -> str:
    parts = []
    if meta.get("gt") is not None:
        parts.append("positive" if meta["gt"] == 0 else f"greater than {_num(meta['gt'])}")
    if meta.get("ge") is not None:
        parts.append(f"at least {_num(meta['ge'])}")
    if meta.get("lt") is not None:
        parts.append(f"less than {_num(meta['lt'])}")
    if meta.get("le") is not None:
        parts.append(f"at most {_num(meta['le'])}")
    return " and ".join(parts)


def check(cfg: Any) -> None:
    """Types, finiteness and bounds of every field of a config dataclass instance."""
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        convert, choices, optional = converter(hints[f.name])
        flag = flag_name(f.name)
        if value is None:
            if optional or f.default is None:
                continue
            raise AgiasiError(f"{flag} is required")
        try:
            value = convert(value)
        except (ValueError, TypeError) as e:
            raise AgiasiError(f"{flag}: {value!r} is not valid ({e})") from None
        setattr(cfg, f.name, value)
        if isinstance(value, float) and not math.isfinite(value):
            raise AgiasiError(f"{flag} must be a finite number, got {value}")
        meta = f.metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = (
                (meta.get("gt") is None or value > meta["gt"])
                and (meta.get("ge") is None or value >= meta["ge"])
                and (meta.get("lt") is None or value < meta["lt"])
                and (meta.get("le") is None or value <= meta["le"])
            )
            if not ok:
                raise AgiasiError(f"{flag} must be {_describe_bound(meta)}, got {value}")


def help_for(f: dataclasses.Field) -> str:
    """The field's help with its range, for ``--help``."""
    text = f.metadata.get("help", "")
    bound = _describe_bound(dict(f.metadata))
    return f"{text} [{bound}]" if bound else text
