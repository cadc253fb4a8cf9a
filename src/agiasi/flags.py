"""Flags ↔ config fields: one ``--flag`` per dataclass field, and flags > file > defaults.

The command line and the studio's forms both go through :func:`parse_config` / the parser
built here, so a value typed into the page is converted, bounded and refused with exactly the
line the command prints.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from agiasi import options
from agiasi.errors import AgiasiError


class FlagParser(argparse.ArgumentParser):
    """Usage errors as one line like every other error (``agiasi: error: …``, exit 2)."""

    def error(self, message: str):
        raise AgiasiError(f"{self.prog.removeprefix('agiasi ')}: {message} (see --help)")


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: Sequence[str] = (),
    positional: Sequence[str] = (),
) -> None:
    """One ``--flag`` per dataclass field (``snake_case`` → ``--kebab-case``), with the field's
    own help, range and choices (:mod:`agiasi.options`).

    Defaults are left as ``None`` on the parser so that a YAML config file can sit between the
    dataclass defaults and the flags (flags > file > defaults); :func:`build_config` merges them.
    """
    hints = options.field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        convert, choices, _ = options.converter(hints[f.name])  # unknown types fail here
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = options.help_for(f).replace("%", "%%")  # argparse formats help with %
        if not helptext:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text")
        if f.name in positional:
            if f.default is None:  # a positional whose field has a default may be left out
                parser.add_argument(f.name, nargs="?", default=None, help=helptext)
            else:
                parser.add_argument(f.name, help=helptext)
            continue
        flag = options.flag_name(f.name)
        if convert is options.parse_bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{helptext} (default: {'on' if default else 'off'})",
            )
            continue
        shown = ",".join(default) if isinstance(default, list) else default
        if isinstance(shown, float):
            shown = f"{shown:g}"
        if shown is not None and shown != "" and "default:" not in helptext:
            helptext = f"{helptext} (default: {shown})"
        parser.add_argument(
            flag,
            dest=f.name,
            type=_argparse_type(convert),
            choices=choices,
            default=None,
            metavar=None if choices else f.name.upper().split("_")[-1],
            help=helptext,
        )


def _argparse_type(convert):
    def parse(text: str):
        try:
            return convert(text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid ({e})") from None

    parse.__name__ = getattr(convert, "__name__", "value").removeprefix("parse_")
    return parse


def build_config(cls: type, args: argparse.Namespace, file_values: dict[str, Any] | None = None):
    """dataclass defaults < config file < explicit flags; file values typed like the flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise AgiasiError(
                f"unknown key {key!r} in the config file; valid keys are the flag names: "
                + ", ".join(sorted(n.replace("_", "-") for n in names))
            )
        values[name] = options.coerce(cls, name, value, "config file")
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        raise AgiasiError(
            "missing required option(s): " + ", ".join(options.flag_name(m) for m in missing)
        )
    return cls(**values)


def parse_config(cls: type, prog: str, argv: Sequence[str], positional: Sequence[str] = ()):
    """``cls`` from ``argv`` as ``prog`` (e.g. ``agiasi train``) parses it: the CLI's errors."""
    parser = FlagParser(prog=prog)
    add_dataclass_args(parser, cls, positional=positional)
    cfg = build_config(cls, parser.parse_args(list(argv)))
    if hasattr(cfg, "validate"):
        cfg.validate()
    else:
        options.check(cfg)
    return cfg
