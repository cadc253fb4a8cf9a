"""Step folders: atomic write, safe read.

Layout of ``OUTPUT/step_N/`` (the note's, kept, plus what makes it self-describing)::

    adapter_config.json         PEFT-loadable LoRA config
    adapter_model.safetensors   LoRA weights
    soul.pt                     {"alpha": tensor, "so8_rotation": state_dict, "step": int}
                                tensors and ints only: loads with torch.load(weights_only=True)
    soul.json                   human-readable: kind, H, α, gate, phase, base model, step, and
                                the full model config needed to rebuild the wrapper
    trainer_state.pt            (training) optimizer, RNG states, data position, step
    train_config.json           (training) the run's TrainConfig

A folder is written as ``.step_N.tmp-<pid>`` and renamed into place only once every file is
flushed, so a killed run never leaves a ``step_N`` that looks complete but is not. This module
owns the format: writing, reading, and finding the step folders of a run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from agiasi._faults import maybe_crash
from agiasi.checkpoint.record import StepRecord
from agiasi.errors import AgiasiError, first_line
from agiasi.weights import base_fingerprint


class SoulModel(Protocol):
    """What the step-folder format reads from and writes into a model — its shape, not its
    class (as torchtune's checkpointer works on state dicts): the checkpoint floor sits below
    the model, and the wrapper satisfies this by having these attributes."""

    config: Any  # agiasi.model.config.ModelConfig: base_model, to_dict()
    hf_config: Any  # the base's transformers config (model_type)
    hidden_size: int
    head: torch.nn.Module  # the LM head (its weight's rows are the vocabulary)
    base_model: torch.nn.Module  # the PEFT model holding the LoRA adapter
    soul: Any  # agiasi.soul.Soul, or None for a control run

    def soul_state(self) -> dict[str, Any]: ...

    def load_soul_state(self, state: dict[str, Any]) -> None: ...


FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SOUL_PT = "soul.pt"
SOUL_JSON = "soul.json"
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SOUL_JSON)
STEP_RE = re.compile(r"^step_(\d+)$")


def required_files(record: StepRecord | None = None) -> tuple[str, ...]:
    files = REQUIRED_FILES
    if record is None or record.soul is not None:
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
        if not pid.isdigit() or int(pid) == os.getpid() or pid_exists(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def pid_exists(pid: int) -> bool:
    """A process with this pid exists (it may belong to someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_folder(final: Path, log=None) -> Iterator[Path]:
    """``with atomic_folder(final) as tmp:`` write into ``tmp``; on success it is fsynced and
    renamed to ``final`` in one step, on any error removed, ``final`` left as it was.

    A full disk becomes one :class:`AgiasiError` saying nothing was written. ``log``, when
    given, hears how long the flush to disk took (an export's gigabytes wait on the disk here).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        maybe_crash("checkpoint_written")
        start = time.perf_counter()
        size = _commit(tmp, final)
        if log is not None:
            log(
                f"flushed {final.name}/ to disk ({size / 2**30:.2f} GiB, "
                f"{time.perf_counter() - start:.1f} s)"
            )
        maybe_crash("checkpoint_renamed")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == 28:
            raise AgiasiError(
                f"disk full while writing {final}; nothing was written there"
            ) from None
        raise


def _commit(tmp: Path, final: Path) -> int:
    """fsync every file and the folder, rename into place; the bytes flushed."""
    size = 0
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
                size += os.fstat(fh.fileno()).st_size
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
    return size


def soul_manifest(wrapper: SoulModel, step: int) -> dict[str, Any]:
    soul = wrapper.soul
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "base_model": wrapper.config.base_model,
        "model_type": wrapper.hf_config.model_type,
        "hidden_size": wrapper.hidden_size,
        "vocab_size": int(wrapper.head.weight.shape[0]),
        "step": int(step),
        "soul": None,
        # the mix is recorded once, in "soul" below (StepRecord.mix reads it)
        "model": {k: v for k, v in wrapper.config.to_dict().items() if k != "soul_mix"},
        # the base's weight files as trained on: export and resume refuse a base that changed
        "base_weights": base_fingerprint(wrapper.config.base_model),
    }
    if soul is not None:
        alpha = float(soul.alpha.detach())
        manifest["soul"] = {
            "kind": soul.config.rotation,
            "init": soul.config.init,
            "hidden_size": soul.config.hidden_size,
            "alpha_mode": soul.config.alpha_mode,
            "mix": soul.config.mix,
            "alpha": alpha,
            "gate": float(soul.gate().detach()),
            "phase": soul.phase(),
            "ortho_error": float(soul.ortho_loss().detach()),
        }
    return manifest


def write_step_files(
    wrapper: SoulModel,
    folder: Path,
    step: int,
    eval_record: dict[str, Any] | None = None,
) -> None:
    """The note's three files + ``soul.json`` (with the step's validation figures, if any)
    into an existing folder."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = get_peft_model_state_dict(wrapper.base_model)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in adapter.items()}, folder / ADAPTER_WEIGHTS
    )
    wrapper.base_model.peft_config["default"].save_pretrained(str(folder))
    if wrapper.soul is not None:
        torch.save({**wrapper.soul_state(), "step": int(step)}, folder / SOUL_PT)
    manifest = soul_manifest(wrapper, step)
    if eval_record is not None:
        manifest["eval"] = dict(eval_record)
    (folder / SOUL_JSON).write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
        encoding="utf-8",
    )


def write_step(
    wrapper: SoulModel,
    folder: Path,
    step: int,
    trainer_state: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    eval_record: dict[str, Any] | None = None,
) -> Path:
    """One complete step folder, atomically; training adds what resume needs."""
    with atomic_folder(Path(folder)) as tmp:
        write_step_files(wrapper, tmp, step, eval_record)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        if train_config is not None:
            (tmp / TRAIN_CONFIG).write_text(
                json.dumps(train_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
    return Path(folder)


def read_manifest(ckpt_dir: str | os.PathLike) -> StepRecord:
    """A step folder's ``soul.json`` as a :class:`StepRecord`, once its files are all there."""
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
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AgiasiError(f"{manifest_path} is not valid JSON: {e}") from None
    manifest = StepRecord.from_json(data, str(manifest_path))
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
            f"({first_line(e)}). agiasi never executes code from checkpoint files."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise AgiasiError(f"{path} is not a readable tensor file: {first_line(e)}") from None


def check_soul_state(state: Any, path: Path) -> dict[str, Any]:
    """``soul.pt`` as the format says: ``alpha`` one finite float, ``so8_rotation`` a mapping of
    float tensors (a file of another shape is one clear error, not a crash in load_state_dict)."""
    if not isinstance(state, dict) or "alpha" not in state or "so8_rotation" not in state:
        raise AgiasiError(f"{path} lacks 'alpha' or 'so8_rotation'")
    alpha, rot = state["alpha"], state["so8_rotation"]
    if not torch.is_tensor(alpha) or not alpha.is_floating_point() or alpha.numel() != 1:
        raise AgiasiError(
            f"{path}: 'alpha' must be one float (a 0-d tensor), got {_describe(alpha)}"
        )
    if (
        not isinstance(rot, dict)
        or not rot
        or not all(
            isinstance(k, str) and torch.is_tensor(v) and v.is_floating_point()
            for k, v in rot.items()
        )
    ):
        raise AgiasiError(f"{path}: 'so8_rotation' must map names to float tensors")
    return state


def read_lora_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` with a usable rank and scale (r a positive int, lora_alpha a
    positive number): the merge scales by lora_alpha / r."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AgiasiError(f"{path} is not readable JSON ({e})") from None
    r, alpha = (cfg.get("r"), cfg.get("lora_alpha")) if isinstance(cfg, dict) else (None, None)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AgiasiError(f"{path}: 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise AgiasiError(f"{path}: 'lora_alpha' must be a positive number, got {alpha!r}")
    return cfg


def _describe(x: Any) -> str:
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def check_same_weights(manifest: StepRecord, ckpt_dir: str | os.PathLike, base_id: str) -> None:
    """Refuse a base whose weight files differ from those the checkpoint was trained on (names,
    sizes, header hashes): same shapes are not the same model."""
    recorded = manifest.base_weights
    now = base_fingerprint(base_id) if recorded else None
    if not recorded or now is None or now == recorded:
        return
    changed = sorted(set(recorded) ^ set(now)) or sorted(k for k in now if now[k] != recorded[k])
    raise AgiasiError(
        f"the base model {base_id!r} is not the one checkpoint {str(ckpt_dir)!r} was trained on: "
        f"its weight files differ ({', '.join(changed[:3])}). Use the base it was trained on "
        "(--base-model PATH to point at a copy)"
    )


def check_same_base(
    manifest: StepRecord,
    ckpt_dir: str | os.PathLike,
    base_id: str,
    hf_config: Any,
    vocab_size: int | None = None,
) -> None:
    """Refuse a checkpoint trained on another base model (shape and architecture differ);
    ``vocab_size`` is the head's rows where a model is loaded, else the config's."""
    got = (manifest.model_type, manifest.hidden_size, manifest.vocab_size)
    if vocab_size is None:
        vocab_size = getattr(hf_config, "vocab_size", None)
    want = (hf_config.model_type, getattr(hf_config, "hidden_size", None), vocab_size)
    if got != want:
        raise AgiasiError(
            f"checkpoint {str(ckpt_dir)!r} was trained on another base model "
            f"({manifest.base_model!r}: model_type {got[0]}, hidden {got[1]}, vocab {got[2]}); "
            f"{base_id!r} is model_type {want[0]}, hidden {want[1]}, vocab {want[2]}"
        )


def load_into(wrapper: SoulModel, ckpt_dir: str | os.PathLike) -> StepRecord:
    """Load LoRA weights and soul from a step folder into an existing wrapper."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir)
    manifest = read_manifest(path)
    check_same_base(
        manifest,
        ckpt_dir,
        wrapper.config.base_model,
        wrapper.hf_config,
        int(wrapper.head.weight.shape[0]),
    )
    try:
        adapter = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise AgiasiError(f"{path / ADAPTER_WEIGHTS} is not readable: {first_line(e)}") from None
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
            f"adapter in {str(ckpt_dir)!r} does not fit this model: {first_line(e)}"
        ) from None
    if wrapper.soul is not None:
        if manifest.soul is None:
            raise AgiasiError(f"checkpoint {str(ckpt_dir)!r} is a control run (no soul)")
        state = check_soul_state(safe_torch_load(path / SOUL_PT), path / SOUL_PT)
        wrapper.load_soul_state(state)
    return manifest


# --------------------------------------------------------------------------- a run's step folders


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step_N`` folder in a run, oldest first."""
    found = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a step folder cannot be resumed from, or None if it is complete."""
    try:
        read_manifest(folder)
    except AgiasiError as e:
        return str(e)
    for f in (TRAINER_STATE, TRAIN_CONFIG):
        if not (Path(folder) / f).is_file():
            return f"missing {f}"
    return None


def find_resume_checkpoint(output_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """Newest complete ``step_N`` in ``output_dir``; incomplete ones are skipped, with a note."""
    for _, folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"resume: skipping {folder.name}: incomplete ({problem})")
    return None


def is_step_folder(path: Path) -> bool:
    """A folder written by :func:`write_step` (what ``eval``/``generate`` accept as a checkpoint)."""
    return Path(path).is_dir() and (Path(path) / SOUL_JSON).is_file()
