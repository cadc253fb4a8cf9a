"""Where a command may write: one rule for every flag that names an output file or folder.

``agiasi eval --report STEP/soul.json`` once overwrote the checkpoint it had just evaluated and
``agiasi plot RUN --out RUN/metrics.jsonl`` the run's metrics. An output is therefore refused,
before any work, when it is one of the command's own inputs (or inside an input folder), or
when it lies inside a folder agiasi or transformers made — a checkpoint, a run, an export, a
model — which are the state of other commands. The one exception is a file the command itself
owns in such a folder (``plot``'s ``RUN/phase_transition.png``), passed as ``own``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from agiasi.errors import AgiasiError

# What marks a folder as another command's state (any one of its files is enough).
STATE_FOLDERS = (
    ("a checkpoint (step folder)", ("soul.json", "soul.pt", "adapter_config.json")),
    ("a training run folder", ("run.json", "train_config.json", "metrics.jsonl")),
    ("an export folder", ("export_report.json",)),
    ("a model folder", ("config.json",)),
)


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def state_folder(folder: Path) -> str | None:
    """What ``folder`` is, if it is a checkpoint, run, export or model folder."""
    for what, markers in STATE_FOLDERS:
        if any((folder / m).exists() for m in markers):
            return what
    return None


def _check_place(out: Path, flag: str, inputs: dict[str, str | os.PathLike | None]) -> Path:
    target = _resolved(out)
    for what, given in inputs.items():
        if not given:
            continue
        path = _resolved(given)
        if target == path or path in target.parents or target in path.parents:
            raise AgiasiError(
                f"{flag} {out} is or overlaps {what} ({path}), which this command reads; "
                "name an output outside it"
            )
    return target


def check_output_file(
    out: str | os.PathLike,
    flag: str,
    inputs: dict[str, str | os.PathLike | None],
    own: Iterable[str | os.PathLike] = (),
) -> Path:
    """A file an output flag names: not an input, not inside another command's folder (unless
    it is one of ``own``), not a folder, with a writable folder to go in. Returns its path."""
    target = _check_place(out, flag, inputs)
    if target.is_dir():
        raise AgiasiError(f"{flag} {out} is a folder; name a file")
    if target not in {_resolved(p) for p in own}:
        _check_not_inside_state(target, flag, out)
    _check_writable(target.parent, flag, out)
    return target


def check_output_folder(
    out: str | os.PathLike, flag: str, inputs: dict[str, str | os.PathLike | None]
) -> Path:
    """A folder an output flag names: not an input, not inside (or holding) another command's
    folder. Whether an existing folder may be replaced is the command's own rule."""
    target = _check_place(out, flag, inputs)
    _check_not_inside_state(target, flag, out)
    existing = next(p for p in [target, *target.parents] if p.exists())
    _check_writable(existing if existing.is_dir() else existing.parent, flag, out)
    return target


def _check_not_inside_state(target: Path, flag: str, out) -> None:
    for folder in target.parents:
        what = state_folder(folder)
        if what is not None:
            raise AgiasiError(
                f"{flag} {out} lies inside {what} ({folder}), which other commands read; "
                "write it elsewhere"
            )


def _check_writable(folder: Path, flag: str, out) -> None:
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise AgiasiError(f"{flag} {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise AgiasiError(f"{flag} {out}: {existing} is not writable")
