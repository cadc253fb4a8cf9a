"""Shared fixtures: tiny models built inside the tests (no hub, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from agiasi.process import configure_process  # noqa: E402

configure_process()  # before anything compiles: the compile cache per forced CPU capability

from tests.helpers import (  # noqa: E402
    build_tiny_llama,
    build_tiny_phi3,
    build_tiny_phi3_with_tokenizer,
)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    return build_tiny_phi3(tmp_path_factory.mktemp("phi3"))


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama_tied"), tie=True)


@pytest.fixture(scope="session")
def tiny_phi3_tok(tmp_path_factory) -> Path:
    """Tiny Phi-3 + Japanese sentencepiece tokenizer: what training and export tests use."""
    return build_tiny_phi3_with_tokenizer(tmp_path_factory.mktemp("phi3_tok"))
