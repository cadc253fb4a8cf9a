"""Step folders: atomic write, safe read.

Layout of ``OUTPUT/step_N/`` (the note's, kept, plus what makes it self-describing)::

    adapter_config.json         PEFT-loadable LoRA config
    adapter_model.safetensors   LoRA weights
    soul.pt                     {"alpha": tensor, "so8_rotation": state_dict, "step": int}
                                tensors and ints only: loads with torch.load(weights_only=True)
    soul.json                   human-readable: kind, H, α, gate, phase, base model, step, and
                                the full model config needed to rebuild the wrapper
    (training adds trainer_state.pt and train_config.json, see agiasi.train)

A folder is written as ``.step_N.tmp-<pid>`` and renamed into place only once every file is
flushed, so a killed run never leaves a ``step_N`` that looks complete but is not.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agiasi._faults import maybe_crash
from agiasi.errors import AgiasiError

if TYPE_CHECKING:
    from agiasi.model import AGIASI_SO8T_Wrapper

FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SOUL_PT = "soul.pt"
SOUL_JSON = "soul.json"
REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SOUL_JSON)


def required_files(manifest: dict[str, Any] | None = None) -> tuple[str, ...]:
    files = REQUIRED_FILES
    if manifest is None or manifest.get("soul") is not None:
        files = files + (SOUL_PT,)
    return files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_temp(final: Path, pattern: str | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings left by processes that are gone.

    ``pattern`` (a glob in ``final``'s parent) widens the search, e.g. ``.step_*.*-*``.
    """
    removed = []
    parent = Path(final).parent
    if not parent.is_dir():
        return removed
    for p in parent.glob(pattern or f".{Path(final).name}.*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temp sibling folder, fsync it, then rename it to ``final``.

    On any error the temp folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        maybe_crash("checkpoint_written")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Replacing a complete folder (e.g. re-saving the last step after a resume): move the
            # old one aside first so there is never a moment without a complete copy on disk.
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        maybe_crash("checkpoint_renamed")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == 28:
            raise AgiasiError(
                f"disk full while writing {final}; nothing was written there"
            ) from None
        raise
    return final


def soul_manifest(wrapper: AGIASI_SO8T_Wrapper, step: int) -> dict[str, Any]:
    soul = wrapper.soul
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "base_model": wrapper.config.base_model,
        "model_type": wrapper.hf_config.model_type,
        "hidden_size": wrapper.hidden_size,
        "vocab_size": int(wrapper.head.weight.shape[0]),
        "step": int(step),
        "soul": None,
        "model": wrapper.config.to_dict(),
    }
    if soul is not None:
        alpha = float(soul.alpha.detach())
        manifest["soul"] = {
            "kind": soul.config.rotation,
            "init": soul.config.init,
            "hidden_size": soul.config.hidden_size,
            "alpha_mode": soul.config.alpha_mode,
            "alpha": alpha,
            "gate": float(soul.gate().detach()),
            "phase": soul.phase(),
            "ortho_error": float(soul.ortho_loss().detach()),
        }
    return manifest


def write_step(
    wrapper: AGIASI_SO8T_Wrapper,
    folder: Path,
    step: int,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write one complete step folder atomically; ``extra(tmp)`` adds trainer files."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        adapter = get_peft_model_state_dict(wrapper.base_model)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in adapter.items()}, tmp / ADAPTER_WEIGHTS
        )
        wrapper.base_model.peft_config["default"].save_pretrained(str(tmp))
        if wrapper.soul is not None:
            torch.save({**wrapper.soul_state(), "step": int(step)}, tmp / SOUL_PT)
        (tmp / SOUL_JSON).write_text(
            json.dumps(soul_manifest(wrapper, step), ensure_ascii=False, indent=2) + "\n",
            encoding="utf-8",
        )
        if extra is not None:
            extra(tmp)

    return atomic_folder(Path(folder), write)


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise AgiasiError(f"checkpoint not found: {str(ckpt_dir)!r} is not a folder")
    manifest_path = path / SOUL_JSON
    if not manifest_path.is_file():
        raise AgiasiError(
            f"{str(ckpt_dir)!r} is not an agiasi checkpoint: it has no {SOUL_JSON} "
            "(expected a step_N folder written by `agiasi train`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AgiasiError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or "model" not in manifest:
        raise AgiasiError(f"{manifest_path} is not an agiasi checkpoint manifest")
    missing = [f for f in required_files(manifest) if not (path / f).is_file()]
    if missing:
        raise AgiasiError(
            f"checkpoint {str(ckpt_dir)!r} is incomplete: missing {', '.join(missing)}"
        )
    return manifest


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a pickled object is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise AgiasiError(
            f"refusing to load {path}: it contains pickled objects, not only tensors "
            f"({_first_line(e)}). agiasi never executes code from checkpoint files."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise AgiasiError(f"{path} is not a readable tensor file: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_compatible(wrapper: AGIASI_SO8T_Wrapper, manifest: dict[str, Any], ckpt_dir) -> None:
    got = (manifest.get("hidden_size"), manifest.get("vocab_size"), manifest.get("model_type"))
    want = (wrapper.hidden_size, int(wrapper.head.weight.shape[0]), wrapper.hf_config.model_type)
    if got != want:
        raise AgiasiError(
            f"checkpoint {str(ckpt_dir)!r} was trained on another base model "
            f"({manifest.get('base_model')!r}: model_type {got[2]}, hidden {got[0]}, vocab {got[1]}); "
            f"this model is {wrapper.config.base_model!r}: model_type {want[2]}, hidden {want[0]}, "
            f"vocab {want[1]}"
        )


def load_into(wrapper: AGIASI_SO8T_Wrapper, ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Load LoRA weights and soul from a step folder into an existing wrapper."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir)
    manifest = read_manifest(path)
    check_compatible(wrapper, manifest, ckpt_dir)
    try:
        adapter = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise AgiasiError(f"{path / ADAPTER_WEIGHTS} is not readable: {_first_line(e)}") from None
    expected = set(get_peft_model_state_dict(wrapper.base_model))
    missing = sorted(expected - set(adapter))
    if missing:
        raise AgiasiError(
            f"adapter in {str(ckpt_dir)!r} is missing {len(missing)} LoRA tensor(s), e.g. "
            f"{missing[0]} (different --lora-targets or a damaged file?)"
        )
    try:
        set_peft_model_state_dict(wrapper.base_model, adapter)
    except RuntimeError as e:
        raise AgiasiError(
            f"adapter in {str(ckpt_dir)!r} does not fit this model: {_first_line(e)}"
        ) from None
    if wrapper.soul is not None:
        if manifest.get("soul") is None:
            raise AgiasiError(f"checkpoint {str(ckpt_dir)!r} is a control run (no soul)")
        state = safe_torch_load(path / SOUL_PT)
        if not isinstance(state, dict) or "alpha" not in state or "so8_rotation" not in state:
            raise AgiasiError(f"{path / SOUL_PT} lacks 'alpha' or 'so8_rotation'")
        wrapper.load_soul_state(state)
    return manifest
