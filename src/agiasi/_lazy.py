"""Lazy package faces (PEP 562): a package's ``__init__`` names what it re-exports and from
which of its modules, and nothing is imported until a name is asked for — so ``agiasi --help``
does not pay for torch, transformers and peft, and ``from agiasi.train import TrainConfig,
train`` still works. Every subpackage uses this one helper rather than its own copy."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_names(table: str) -> dict[str, str]:
    """A package's export table — one line per submodule, ``module: name name …`` — as
    ``{name: module}``. A table rather than a dict literal: it reads as the package's contents,
    one module a line."""
    exports: dict[str, str] = {}
    for line in table.strip().splitlines():
        module, _, names = line.partition(":")
        for name in names.split():
            if name in exports:
                raise ValueError(f"{name} is exported twice")
            exports[name] = module.strip()
    return exports


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the
    submodule (relative to ``package``) that defines it."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
