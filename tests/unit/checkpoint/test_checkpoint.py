"""Step folders: layout, safe loading, from_checkpoint, the note's inference snippet."""

import json
import os

import pytest
import torch

from agiasi import AGIASI_SO8T_Wrapper
from agiasi.checkpoint.step_folder import read_manifest, safe_torch_load, write_step
from agiasi.errors import AgiasiError
from tests.helpers import build_tiny_llama, make_wrapper, randomize_lora, randomize_soul


@pytest.fixture()
def trained_ckpt(tiny_phi3, tmp_path):
    w = make_wrapper(tiny_phi3)
    randomize_soul(w, alpha=1.2)
    randomize_lora(w)
    folder = write_step(w, tmp_path / "run" / "step_7", step=7)
    return w, folder


def test_step_folder_has_exactly_the_note_files(trained_ckpt):
    w, folder = trained_ckpt
    assert sorted(os.listdir(folder)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "soul.json",
        "soul.pt",
    ]
    # no temp folder left behind
    assert sorted(os.listdir(folder.parent)) == ["step_7"]
    soul = torch.load(folder / "soul.pt", weights_only=True)
    assert set(soul) == {"alpha", "so8_rotation", "step"} and soul["step"] == 7
    assert soul["alpha"].item() == pytest.approx(1.2)
    assert torch.equal(soul["so8_rotation"]["skew_params"], w.so8_rotation.skew_params.detach())
    meta = json.loads((folder / "soul.json").read_text(encoding="utf-8"))
    assert meta["soul"]["kind"] == "so8" and meta["soul"]["phase"] == "🟡 Transitioning"
    assert meta["hidden_size"] == 64 and meta["step"] == 7
    assert meta["soul"]["gate"] == pytest.approx(torch.sigmoid(torch.tensor(1.2)).item())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and sorted(cfg["target_modules"]) == ["o_proj", "qkv_proj"]


def test_from_checkpoint_restores_logits(trained_ckpt):
    w, folder = trained_ckpt
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        want = w.eval()(ids).logits
    w2 = AGIASI_SO8T_Wrapper.from_checkpoint(
        folder, device="cpu", quantization="none", dtype="float32"
    )
    with torch.no_grad():
        got = w2.eval()(ids).logits
    assert (got - want).abs().max() <= 1e-6


def test_note_inference_snippet_runs_with_only_the_import_changed(trained_ckpt, tiny_phi3):
    w, folder = trained_ckpt
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        want = w.eval()(ids).logits
    # --- the note's snippet (section 6), import line changed; base id -> our tiny model ---
    model = AGIASI_SO8T_Wrapper(str(tiny_phi3), quantization="none", dtype="float32")
    model.base_model.load_adapter(str(folder))
    soul = torch.load(str(folder / "soul.pt"))
    model.alpha.data = soul["alpha"]
    model.so8_rotation.load_state_dict(soul["so8_rotation"])
    model.eval()
    # --- end of snippet ---
    with torch.no_grad():
        got = model(ids).logits.cpu()  # the snippet picks the GPU where there is one
    assert (got - want).abs().max() <= 1e-5


def test_pickled_soul_is_refused_not_executed(trained_ckpt, tmp_path):
    _, folder = trained_ckpt
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"alpha": torch.tensor(0.0), "so8_rotation": {}, "evil": Evil()}, folder / "soul.pt")
    with pytest.raises(AgiasiError, match="refusing to load"):
        safe_torch_load(folder / "soul.pt")
    assert not marker.exists()


def test_checkpoint_from_another_base_is_refused(trained_ckpt, tmp_path):
    _, folder = trained_ckpt
    other = build_tiny_llama(tmp_path / "other", hidden=32)
    w = make_wrapper(other)
    from agiasi.checkpoint.step_folder import load_into

    with pytest.raises(AgiasiError, match="another base model"):
        load_into(w, folder)


def test_incomplete_or_foreign_folders_are_refused(trained_ckpt, tmp_path):
    _, folder = trained_ckpt
    (folder / "soul.pt").unlink()
    with pytest.raises(AgiasiError, match="incomplete: missing soul.pt"):
        read_manifest(folder)
    (tmp_path / "random").mkdir()
    with pytest.raises(AgiasiError, match="not an agiasi checkpoint"):
        read_manifest(tmp_path / "random")
    with pytest.raises(AgiasiError, match="checkpoint not found"):
        read_manifest(tmp_path / "missing")


def test_failed_write_leaves_nothing(tiny_phi3, tmp_path):
    from agiasi.checkpoint.step_folder import atomic_folder, write_step_files

    w = make_wrapper(tiny_phi3)
    with pytest.raises(AgiasiError, match="disk full"):
        with atomic_folder(tmp_path / "run" / "step_1") as tmp:
            write_step_files(w, tmp, step=1)
            (tmp / "partial").write_text("x")
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path / "run") == []


@pytest.mark.parametrize("mix", ["convex", "residual"])
def test_the_mix_is_recorded_and_restored(tiny_phi3, tmp_path, mix):
    w = make_wrapper(tiny_phi3, soul_mix=mix)
    randomize_soul(w, alpha=1.2)
    folder = write_step(w, tmp_path / "run" / "step_1", step=1)
    meta = json.loads((folder / "soul.json").read_text(encoding="utf-8"))
    assert meta["soul"]["mix"] == mix and "soul_mix" not in meta["model"]  # recorded once
    assert set(torch.load(folder / "soul.pt", weights_only=True)) == {
        "alpha",
        "so8_rotation",
        "step",
    }  # soul.pt is unchanged by the option
    w2 = AGIASI_SO8T_Wrapper.from_checkpoint(folder, device="cpu", dtype="float32")
    assert w2.soul.config.mix == mix


def test_a_checkpoint_from_before_the_mix_option_loads_as_residual(trained_ckpt):
    """Step folders written before --soul-mix existed trained the note's formula."""
    w, folder = trained_ckpt
    meta = json.loads((folder / "soul.json").read_text(encoding="utf-8"))
    del meta["soul"]["mix"]  # (older folders also had model.soul_mix: see test_export)
    (folder / "soul.json").write_text(json.dumps(meta), encoding="utf-8")
    old = AGIASI_SO8T_Wrapper.from_checkpoint(folder, device="cpu", dtype="float32").eval()
    assert old.soul.config.mix == "residual"
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        h = old.hidden_states(ids)
        g = old.soul.gate()
        want = torch.nn.functional.linear(h + g * old.so8_rotation(h), old.head.weight)
        assert (old(ids).logits - want).abs().max() <= 1e-5


def test_step_record_reads_soul_json_one_way():
    """The mix has one place and one legacy default; malformed fields are one error each."""
    from agiasi.checkpoint.record import StepRecord

    soul = {"kind": "so8", "hidden_size": 64, "alpha": 1.2, "gate": 0.77}
    new = StepRecord.from_json({"model": {}, "soul": {**soul, "mix": "convex"}}, "a")
    assert new.mix == new.soul.mix == "convex" and new.soul.alpha == 1.2
    # written before the soul record held the mix: the model options say it
    older = StepRecord.from_json({"model": {"soul_mix": "convex"}, "soul": soul}, "b")
    assert older.mix == "convex"
    # from before the option existed: the note's residual mix, for souls and control runs
    oldest = StepRecord.from_json({"model": {}, "soul": soul}, "c")
    assert oldest.mix == "residual"
    control = StepRecord.from_json({"model": {}, "soul": None}, "d")
    assert control.soul is None and control.mix == "residual"
    bad = [
        ({"soul": None}, "not an agiasi checkpoint manifest"),
        ({"model": [1], "soul": None}, "'model' must be a mapping"),
        ({"model": {}, "soul": {"kind": "so8"}}, "needs its 'kind' and 'hidden_size'"),
        ({"model": {}, "soul": {**soul, "mix": "sum"}}, "unknown soul mix 'sum'"),
        ({"model": {}, "soul": None, "step": "10"}, "'step' must be int"),
        ({"model": {}, "soul": {**soul, "alpha": "big"}}, "soul 'alpha' has the wrong type"),
    ]
    for data, message in bad:
        with pytest.raises(AgiasiError, match=message):
            StepRecord.from_json(data, "soul.json")
