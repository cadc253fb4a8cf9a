"""What the package ships (see assets/NOTICE): the tiny Japanese Phi-3, its two texts and the
JGLUE validation sets.

One place for the paths, at the bottom floor, so that the data stage, evaluation and the demo
all find them without importing each other.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _asset(*parts: str) -> Path:
    return Path(str(resources.files("agiasi").joinpath("assets", *parts)))


def tiny_model_path() -> Path:
    """The shipped tiny Japanese Phi-3 (an HF folder)."""
    return _asset("tiny-ja-phi3")


def default_dataset() -> Path:
    """The Japanese training sample: the Mew manual without its first 30 KB."""
    return _asset("data", "sample_ja.txt")


def default_heldout() -> Path:
    """The Mew manual's first 30 KB, never trained on."""
    return _asset("data", "heldout_ja.txt")


def jglue_file(name: str) -> Path:
    """One of the JGLUE v1.3 files the package ships (CC BY-SA 4.0, see assets/NOTICE)."""
    return _asset("jglue", name)
