"""The studio touches files only under its root (and reads the shipped assets)."""

from __future__ import annotations

import os

import pytest

from agiasi.errors import AgiasiError
from agiasi.shipped import tiny_model_path
from agiasi.studio.paths import check_datasets, check_model, resolve


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "root"
    (r / "data").mkdir(parents=True)
    (r / "data" / "a.jsonl").write_text("{}\n")
    (tmp_path / "secret.txt").write_text("x")
    os.symlink(tmp_path / "secret.txt", r / "data" / "link.txt")
    os.symlink(tmp_path, r / "up")
    return r


@pytest.mark.parametrize(
    "value",
    ["../secret.txt", "data/../../secret.txt", "/etc/passwd", "data/link.txt", "up/secret.txt",
     "up", "", "data/\x00x"],
)  # fmt: skip
def test_outside_the_root_is_refused(root, value):
    with pytest.raises(AgiasiError, match="outside the studio's root|give a path"):
        resolve(root, value)


def test_inside_the_root_and_the_shipped_assets_for_reading_only(root):
    assert resolve(root, "data/a.jsonl") == (root / "data" / "a.jsonl").resolve()
    assert resolve(root, str(root / "data")) == (root / "data").resolve()
    shipped = str(tiny_model_path())
    assert resolve(root, shipped) == tiny_model_path().resolve()
    with pytest.raises(AgiasiError, match="outside"):
        resolve(root, shipped, write=True)


def test_models_and_datasets(root):
    assert (
        check_model(root, "AXCXEPT/Borea-Phi-3.5-mini-Instruct-Jp")
        == "AXCXEPT/Borea-Phi-3.5-mini-Instruct-Jp"
    )
    with pytest.raises(AgiasiError, match="outside"):
        check_model(root, "../../x")
    assert check_datasets(root, "data/a.jsonl,hf:owner/name", "dataset").endswith(",hf:owner/name")
    with pytest.raises(AgiasiError, match="outside"):
        check_datasets(root, "data/a.jsonl,../secret.txt", "--dataset")
