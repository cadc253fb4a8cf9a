"""Exports under the studio's root: started as ``agiasi export`` subprocesses after the
command's own checks, found from their folders (``export_report.json``) and launch records,
shown with the report the CLI prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError
from agiasi.studio.runs import (
    STATE_DIR,
    _read_json,
    _slug,
    folders_holding,
    last_error_line,
    launch,
    pid_alive,
    tail_lines,
)

REPORT = "export_report.json"


def record_path(root: Path, rel: str) -> Path:
    return root / STATE_DIR / "exports" / f"{_slug(rel)}.json"


def log_path(root: Path, rel: str) -> Path:
    return root / STATE_DIR / "logs" / f"export-{_slug(rel)}.log"


def start_export(root: Path, checked, shown, flags: list[str], meta: dict[str, Any]) -> int:
    """The CLI's checks before any write (the plan: inputs, flags, disk, an existing --out, a
    second export into the same folder) on ``checked`` (absolute paths), then ``agiasi export``
    as ``shown`` says it (paths relative to the root, where it runs) as a subprocess."""
    from agiasi.export.run import _output_lock, plan_export

    check_not_running(root, shown.out)
    plan_export(checked, log=lambda m: None)
    with _output_lock(Path(checked.out)):
        pass  # held by a running export: its message
    argv = ["export", shown.checkpoint, *flags]
    return launch(root, record_path(root, shown.out), log_path(root, shown.out), argv,
                  {"out": shown.out, "checkpoint": str(checked.checkpoint), **meta})  # fmt: skip


def export_state(root: Path, rel: str, details: bool = False) -> dict[str, Any]:
    """One export: running, finished or failed (with its error line), and with ``details`` the
    report as the CLI prints it, its parity rows, the Modelfile, the card, the files."""
    folder = root / rel
    record = _read_json(record_path(root, rel)) or {}
    report = _read_json(folder / REPORT) if folder.is_dir() else None
    out: dict[str, Any] = {"name": rel, "error": None, "command": record.get("command"),
                           "checkpoint": (report or {}).get("checkpoint") or record.get("checkpoint")}  # fmt: skip
    if pid_alive(record.get("pid")) and record.get("exit_code") is None:
        out["state"] = "running"
    elif record.get("exit_code") not in (None, 0):
        out["state"] = "failed"
        out["error"] = last_error_line(log_path(root, rel)) or f"exit code {record['exit_code']}"
    elif report is not None:
        out["state"] = "finished"
        measure = report.get("measure")
        if isinstance(measure, dict) and measure.get("status") == "failed":
            out["error"] = f"the fidelity measure failed at {measure.get('stage')!r}"
    else:
        out["state"] = "failed" if record else "unknown"
        out["error"] = last_error_line(log_path(root, rel)) if record else None
    if not details:
        return out
    out["log"] = tail_lines(log_path(root, rel), 40)
    if report is not None:
        from agiasi.export.files import format_report

        out["report_text"] = format_report(report)
        out["parity"] = report.get("parity")
    for name in ("Modelfile", "README.md"):
        try:
            text = (folder / name).read_text(encoding="utf-8")
        except OSError:
            continue
        out[name] = text[: 64 * 1024]
    if folder.is_dir():
        out["files"] = sorted(
            ({"name": p.relative_to(folder).as_posix(), "size": p.stat().st_size}
             for p in folder.rglob("*")
             if p.is_file() and not any(x.startswith(".") for x in p.relative_to(folder).parts)),
            key=lambda f: f["name"],
        )  # fmt: skip
        ggufs = [f["name"] for f in out["files"] if f["name"].endswith(".gguf")]
        name = Path(rel).name
        out["run_commands"] = [f"ollama create {name} -f {rel}/Modelfile"] + [
            f"llama-cli -m {rel}/{g} -cnv" for g in ggufs[:2]
        ]
    return out


def find_exports(root: Path) -> list[dict[str, Any]]:
    found = folders_holding(root, (REPORT,), "exports", "out")
    return sorted((export_state(root, rel) for rel in found), key=lambda e: e["name"])


def check_not_running(root: Path, rel: str) -> None:
    state = export_state(root, rel)
    if state["state"] == "running":
        raise AgiasiError(
            f"another `agiasi export` is writing {rel}; wait for it or pick another --out"
        )


def parameter_count(checkpoint: Path) -> int:
    """Parameters of the model a step folder (or a run folder's last step) exports: its base
    model built from config.json on the meta device (no weights read)."""
    from agiasi.checkpoint.run_folder import is_run_folder, resolve_step
    from agiasi.checkpoint.step_folder import read_manifest
    from agiasi.model.config import checkpoint_model_config
    from agiasi.model.loading import load_config, meta_model

    ckpt = resolve_step(checkpoint, "last") if is_run_folder(checkpoint) else checkpoint
    manifest = read_manifest(ckpt)
    base = checkpoint_model_config(manifest, ckpt, {})["base_model"]
    return sum(p.numel() for p in meta_model(load_config(base)).parameters())
