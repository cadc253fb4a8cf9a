"""The run folder: one run's home, held by one process, never written before start-up passed.

``OUT/`` holds ``step_N/`` folders (checkpoint.py owns their format), ``metrics.jsonl`` (one JSON
line a step, plus validation figures where they were measured), ``train_config.json``,
``best.json`` (the step with the lowest validation loss) and ``phase_transition.png``.

A lock keeps a second run out (``filelock``, so it holds on Windows too; the error names the
holder's pid, kept in a file beside the lock because a lock file's own content is truncated by
whoever tries it). A folder that already holds a run is refused unless ``--resume`` continues it
or ``--overwrite`` replaces it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from agiasi.checkpoint.step_folder import TRAIN_CONFIG, clean_stale_temp, list_checkpoints
from agiasi.errors import AgiasiError

METRICS = "metrics.jsonl"
LOCK = ".agiasi-train.lock"
PID = ".agiasi-train.pid"
PLOT = "phase_transition.png"
BEST = "best.json"
RUN = "run.json"  # the run's identity: {"run_id"}, written at its first start
REFERENCE = "reference_logps.safetensors"  # DPO's precomputed reference (agiasi.train.reference)
STATUS = "status.json"  # {"state": running|finished|stopped|failed, "step", "error", "pid"}
OWN_FILES = (METRICS, TRAIN_CONFIG, PLOT, BEST, RUN, REFERENCE, STATUS)


class RunLock:
    """Exclusive hold on a run folder for the whole run (released by the OS if the process
    dies, so a killed run never blocks its own ``--resume``)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir / LOCK
        self._lock = None
        self._created_dir = False

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        try:
            if not self.out_dir.exists():
                self.out_dir.mkdir(parents=True)
                self._created_dir = True
            lock = FileLock(str(self.path))
            lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = (self.out_dir / PID).read_text(encoding="utf-8").strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise AgiasiError(
                f"--output-dir {self.out_dir} is in use by another `agiasi train` (pid {holder}); "
                "wait for it to finish or pick another --output-dir"
            ) from None
        except OSError as e:
            raise AgiasiError(
                f"cannot write to --output-dir {self.out_dir}: {e.strerror or e}"
            ) from None
        (self.out_dir / PID).write_text(f"{os.getpid()}\n", encoding="utf-8")
        self._lock = lock

    def release(self) -> None:
        if self._lock is None:
            return
        (self.out_dir / PID).unlink(missing_ok=True)
        self._lock.release()
        self.path.unlink(missing_ok=True)
        self._lock = None
        if self._created_dir and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()  # a run that failed at start-up leaves no empty folder behind


def refuse_links(out_dir: Path) -> None:
    """No file or step folder agiasi writes, trims or removes in a run folder may be a symbolic
    link: writing through one changes (or deletes) its target, wherever that is."""
    if not out_dir.is_dir():
        return
    names = [*OWN_FILES, LOCK, PID]
    entries = [out_dir / n for n in names] + [
        p for p in out_dir.iterdir() if p.name.startswith("step_")
    ]
    for path in entries:
        if path.is_symlink():
            raise AgiasiError(
                f"{path} is a symbolic link (to {os.readlink(path)}); agiasi never writes through "
                "links in a run folder. Replace it with the real file or folder"
            )


def check_output_path(out_dir: Path) -> None:
    """A folder we can create or write (checked before the lock creates anything)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AgiasiError(f"--output-dir {out_dir} is a file; pass a folder")
    existing = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise AgiasiError(f"--output-dir {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise AgiasiError(f"--output-dir {out_dir}: {existing} is not writable")


def check_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Not another run's folder, unless this run continues or replaces it (under the lock)."""
    if resume or overwrite or not out_dir.is_dir():
        return
    taken = sorted(p.name for p in out_dir.iterdir() if p.name not in (LOCK, PID))
    if taken:
        shown = ", ".join(taken[:3]) + (", …" if len(taken) > 3 else "")
        raise AgiasiError(
            f"--output-dir {out_dir} already holds a run ({shown}); pass --resume auto to "
            "continue it, --overwrite to replace it, or another --output-dir"
        )


def replace_previous_run(out_dir: Path, say) -> None:
    """``--overwrite``: remove what an earlier run wrote (only agiasi's own files)."""
    removed = 0
    for _, folder in list_checkpoints(out_dir):
        shutil.rmtree(folder)
        removed += 1
    for name in OWN_FILES:
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed += 1
    if removed:
        say(f"overwrite: removed the previous run in {out_dir} ({removed} entries)")


def trim_metrics(path: Path, keep_upto: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= keep_upto:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def last_loss(path: Path, step: int) -> float:
    if path.is_file():
        for line in reversed(path.read_text(encoding="utf-8").splitlines()):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step") == step and isinstance(rec.get("loss"), (int, float)):
                return float(rec["loss"])
    return float("nan")


def prepare_run_folder(
    out_dir: Path, config: dict[str, Any], start_step: int, overwrite: bool, run_id: str, say
) -> None:
    """The first writes of the run, after everything that can fail at start-up has passed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        replace_previous_run(out_dir, say)
    if read_run_id(out_dir) != run_id:
        _write_json_atomic(out_dir / RUN, {"run_id": run_id})
    for stale in clean_stale_temp(out_dir / "step_0", pattern=".step_*.*-*"):
        say(f"resume: removed {stale.name}, a step folder a killed run left half-written")
    trim_metrics(out_dir / METRICS, start_step)
    best = read_best(out_dir)
    if best is not None and best["step"] > start_step:
        (out_dir / BEST).unlink()  # measured after the step resumed from: it will be redone
    (out_dir / TRAIN_CONFIG).write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def write_status(out_dir: Path, state: str, step: int | None = None, error: str | None = None):
    """The run's state for anyone watching its folder (``agiasi studio``): written when the
    run starts and when it ends, however it ends that Python sees."""
    record = {"state": state, "step": step, "pid": os.getpid(), "time": time.time()}
    if error:
        record["error"] = error
    _write_json_atomic(Path(out_dir) / STATUS, record)


def read_status(out_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(out_dir) / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("state"), str) else None


def read_best(out_dir: Path) -> dict[str, Any] | None:
    """``{"step", "eval_loss", ...}`` of the run's best validated step, or None."""
    path = Path(out_dir) / BEST
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise AgiasiError(f"{path} is not valid JSON; delete it or rerun the validation") from None
    if not isinstance(best, dict) or not isinstance(best.get("step"), int):
        raise AgiasiError(f"{path} does not name a step")
    return best


def write_best(out_dir: Path, record: dict[str, Any]) -> None:
    _write_json_atomic(Path(out_dir) / BEST, record)


def _write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """A reader never sees half a file (and a link in its place is replaced, not followed)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_run_id(out_dir: Path) -> str | None:
    path = Path(out_dir) / RUN
    try:
        rid = json.loads(path.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


def run_identity(out_dir: Path, resume_from: Path | None, ckpt_run_id: str | None) -> str:
    """The id this run goes on under. A fresh run gets a new one; a resume keeps its
    checkpoint's. A folder holding another run is never resumed into: that would mix two
    runs' step folders and metrics, and a later ``--resume auto`` would continue the wrong one."""
    import uuid

    if resume_from is None:
        return uuid.uuid4().hex
    folder_id = read_run_id(out_dir)
    inside = Path(resume_from).resolve().parent == Path(out_dir).resolve()
    holds_run = (
        Path(out_dir).is_dir()
        and any((Path(out_dir) / n).exists() for n in (METRICS, TRAIN_CONFIG))
        or bool(list_checkpoints(out_dir))
    )
    foreign = (
        (folder_id is not None and ckpt_run_id is not None and folder_id != ckpt_run_id)
        or (folder_id is not None and ckpt_run_id is None and not inside)
        or (folder_id is None and holds_run and not inside)
    )
    if foreign:
        raise AgiasiError(
            f"--output-dir {out_dir} holds another run than the one {resume_from} belongs to; "
            "resuming into it would mix the two. Resume into that checkpoint's own run folder or "
            "into a new --output-dir"
        )
    return ckpt_run_id or folder_id or uuid.uuid4().hex


def is_run_folder(path: Path) -> bool:
    """A folder ``agiasi train`` wrote into (its metrics or config, not a step folder itself)."""
    from agiasi.checkpoint.step_folder import is_step_folder

    p = Path(path)
    if not p.is_dir() or is_step_folder(p):
        return False
    return (p / METRICS).is_file() or (p / TRAIN_CONFIG).is_file()


def _validated(run_dir: Path) -> bool:
    """Whether the run's own config asked for validation."""
    try:
        cfg = json.loads((run_dir / TRAIN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("eval_dataset") or cfg.get("eval_split"))


def resolve_step(run_dir: Path, which: str) -> Path:
    """``best`` (``best.json``), ``last`` (the newest complete step) or ``N`` → its step folder."""
    from agiasi.checkpoint.step_folder import checkpoint_problem, find_resume_checkpoint

    run_dir = Path(run_dir)
    if not is_run_folder(run_dir):
        raise AgiasiError(
            f"--step needs a run folder (written by `agiasi train`); {run_dir} is not one"
        )
    if which == "best":
        best = read_best(run_dir)
        if best is None:
            if _validated(run_dir):
                raise AgiasiError(
                    f"{run_dir} was trained with validation but its {BEST} is missing or "
                    "damaged (deleted?); use --step last or a step number (each step folder's "
                    "soul.json holds its eval_loss)"
                )
            raise AgiasiError(
                f"{run_dir} has no {BEST}: it was trained without validation "
                "(--eval-dataset or --eval-split); use --step last or a step number"
            )
        folder = run_dir / f"step_{best['step']}"
    elif which == "last":
        found = find_resume_checkpoint(run_dir, lambda msg: None)
        if found is None:
            raise AgiasiError(f"{run_dir} holds no complete step folder")
        return found
    elif which.isdigit():
        folder = run_dir / f"step_{int(which)}"
    else:
        raise AgiasiError(f"--step {which!r}: use best, last or a step number")
    problem = checkpoint_problem(folder)
    if problem is not None:
        steps = ", ".join(p.name for _, p in list_checkpoints(run_dir)) or "none"
        raise AgiasiError(f"{folder} cannot be used: {problem} (step folders here: {steps})")
    return folder
