"""Runs under the studio's root: found from their folders, started as ``agiasi train``
subprocesses, stopped the way Ctrl-C stops them.

The files are the state, never the server's memory: a run is a folder holding
``train_config.json`` (and, while or after it runs, ``metrics.jsonl``, ``status.json``, the
lock's pid file). The studio adds only a launch record per run it started
(``ROOT/.agiasi-studio/runs/*.json``: the argv, the pid, the exit code once it is known) and
the trainer's output (``ROOT/.agiasi-studio/logs/*.log``), outside the run folder so that the
trainer's own checks of it stay the CLI's. A restarted studio, a second tab or a reload reads
the same files; a run started from a terminal is listed like any other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agiasi.checkpoint.run_folder import (
    LOCK,
    METRICS,
    PID,
    check_output_dir,
    check_output_path,
    read_best,
    read_status,
)
from agiasi.checkpoint.step_folder import TRAIN_CONFIG, list_checkpoints, pid_exists
from agiasi.errors import AgiasiError

STATE_DIR = ".agiasi-studio"
MAX_DEPTH = 4  # folders below the root searched for runs
ERROR_PREFIX = "agiasi: error: "


def _slug(rel: str) -> str:
    return rel.replace("/", "__") or "_"


def launch_path(root: Path, rel: str) -> Path:
    return root / STATE_DIR / "runs" / f"{_slug(rel)}.json"


def log_path(root: Path, rel: str) -> Path:
    return root / STATE_DIR / "logs" / f"{_slug(rel)}.log"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def pid_alive(pid: Any) -> bool:
    """A live process running agiasi (a recycled pid running something else is not)."""
    if not isinstance(pid, int) or pid <= 0 or not pid_exists(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: the kill test is all there is
    if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
        return False  # a zombie: finished, not yet reaped
    return b"agiasi" in cmdline


def _trainer_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / PID).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def last_error_line(log: Path, limit: int = 256 * 1024) -> str | None:
    """The CLI's one error line from the end of a run's log, if it printed one."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - limit))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    errors = [x for x in tail.splitlines() if x.startswith(("agiasi: error:", "agiasi: internal"))]
    return errors[-1].removeprefix(ERROR_PREFIX) if errors else None


def tail_lines(path: Path, n: int = 30, limit: int = 64 * 1024) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - limit))
            return fh.read().decode("utf-8", "replace").splitlines()[-n:]
    except OSError:
        return []


def run_state(root: Path, rel: str) -> dict[str, Any]:
    """One run as the page shows it: running, finished, stopped or failed (with its error
    line), its step and length, method and best step — all read from files."""
    run_dir = root / rel
    config = _read_json(run_dir / TRAIN_CONFIG) or {}
    launch = _read_json(launch_path(root, rel)) or {}
    status = read_status(run_dir) or {}
    steps = [s for s, _ in list_checkpoints(run_dir)] if run_dir.is_dir() else []
    out: dict[str, Any] = {
        "name": rel,
        "max_steps": config.get("max_steps") or launch.get("max_steps"),
        "method": config.get("method", "sft") if config else launch.get("method"),
        "saved_step": max(steps) if steps else None,
        "step": _last_logged_step(run_dir / METRICS),
        "error": None,
        "started_by_studio": bool(launch),
    }
    trainer = _trainer_pid(run_dir)
    ended = status.get("state") in ("finished", "stopped", "failed") and (
        not launch or status.get("time", 0) >= launch.get("started", 0)
    )  # the trainer's own last word about this launch
    if pid_alive(trainer) or (status.get("state") == "running" and pid_alive(status.get("pid"))):
        out["state"] = "running"
    elif ended:
        out["state"] = status["state"]
        if status["state"] == "failed":
            out["error"] = status.get("error")
    elif pid_alive(launch.get("pid")) and launch.get("exit_code") is None:
        out["state"] = "starting"
    elif launch.get("exit_code") is not None:
        code = launch["exit_code"]
        out["state"] = "finished" if code == 0 else "stopped" if code in (130, 143) else "failed"
        if out["state"] == "failed":
            out["error"] = last_error_line(log_path(root, rel)) or f"exit code {code}"
    elif launch:  # the studio that started it went away before it ended: the log says how
        err = last_error_line(log_path(root, rel))
        out["state"] = "failed" if err else "stopped"
        out["error"] = err
    else:
        out["state"] = "stopped" if status.get("state") == "running" else "unknown"
    try:
        out["best"] = read_best(run_dir)
    except AgiasiError:
        out["best"] = None
    return out


def _last_logged_step(metrics: Path) -> int | None:
    lines = tail_lines(metrics, 3, 16 * 1024)
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def folders_holding(root: Path, names: tuple[str, ...], record_dir: str, key: str) -> set[str]:
    """Folders under the root (``MAX_DEPTH`` deep, hidden and step folders skipped) holding
    one of ``names``, and those the studio's launch records in ``record_dir`` name by ``key``:
    what a run list or an export list shows, found from the files alone."""
    found: set[str] = set()
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "step_")))
        if len(here.parts) - base_depth >= MAX_DEPTH:
            dirnames[:] = []
        if any(n in filenames for n in names):
            found.add(here.relative_to(root).as_posix())
            dirnames[:] = []  # nothing of the kind nests inside another
    for rec in (root / STATE_DIR / record_dir).glob("*.json"):
        data = _read_json(rec)
        if data and isinstance(data.get(key), str):
            found.add(data[key])
    return found


def find_runs(root: Path) -> list[dict[str, Any]]:
    """Every run folder under the root (and every run the studio launched), newest first."""
    found = folders_holding(root, (TRAIN_CONFIG, METRICS), "runs", "output_dir")
    runs = [run_state(root, rel) for rel in found]

    def started(r: dict[str, Any]) -> float:
        launch = _read_json(launch_path(root, r["name"])) or {}
        try:
            return launch.get("started") or (root / r["name"]).stat().st_mtime
        except OSError:
            return 0.0

    return sorted(runs, key=started, reverse=True)


def any_running(root: Path) -> list[str]:
    return [r["name"] for r in find_runs(root) if r["state"] in ("running", "starting")]


def start_run(root: Path, rel: str, flags: list[str], resume: bool, meta: dict[str, Any]) -> int:
    """``agiasi train FLAGS`` in its own process group (a crash of the trainer cannot take the
    server down, and Ctrl-C on the server does not reach it), its output to the run's log.
    The CLI's own checks of the output folder run first, with the CLI's messages."""
    run_dir = root / rel
    check_output_path(run_dir)
    if run_dir.is_dir() and (run_dir / LOCK).exists() and pid_alive(_trainer_pid(run_dir)):
        raise AgiasiError(
            f"--output-dir {rel} is in use by another `agiasi train` (pid "
            f"{_trainer_pid(run_dir)}); wait for it to finish or pick another --output-dir"
        )
    overwrite = "--overwrite" in flags
    check_output_dir(run_dir, resume, overwrite)
    argv = ["train", *flags, "--no-progress"] + (["--resume", "auto"] if resume else [])
    return launch(root, launch_path(root, rel), log_path(root, rel), argv,
                  {"output_dir": rel, **meta})  # fmt: skip


def launch(root: Path, record: Path, log: Path, argv: list[str], meta: dict[str, Any]) -> int:
    """``agiasi ARGV`` in its own process group (a crash of it cannot take the server down,
    and Ctrl-C on the server does not reach it), its output appended to ``log``, its launch
    record (argv, pid, then the exit code) in ``record``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n$ agiasi {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(  # an argv list, never a shell
            [sys.executable, "-m", "agiasi", *argv],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    data = {"argv": argv, "pid": proc.pid, "started": time.time(), "exit_code": None, **meta}
    _write_json(record, data)

    def wait() -> None:  # the exit code, for a job that dies before its own files say so
        code = proc.wait()
        rec = _read_json(record) or data
        if rec.get("pid") == proc.pid:
            _write_json(record, {**rec, "exit_code": code, "ended": time.time()})

    threading.Thread(target=wait, daemon=True).start()
    return proc.pid


def stop_run(root: Path, rel: str) -> int:
    """Ask the run to stop as Ctrl-C does: it finishes the step in flight and saves it."""
    run_dir = root / rel
    for pid in (_trainer_pid(run_dir), (_read_json(launch_path(root, rel)) or {}).get("pid")):
        if pid_alive(pid):
            os.kill(pid, signal.SIGINT)
            return pid
    raise AgiasiError(f"{rel} is not running")


def inside(root: Path, path: str | None, rel: str) -> bool:
    """Whether ``path`` (absolute, or as a command under the root names it) is inside the run
    folder ``rel``: how the run page finds its exports and evaluations on disk."""
    if not path:
        return False
    p = Path(path)
    p = (p if p.is_absolute() else root / p).resolve()
    return p.is_relative_to((root / rel).resolve())
