"""Evaluations from the page: ``agiasi eval --task … [--compare A,B]`` (JGLUE) or ``agiasi eval
--compare A,B`` (held-out perplexity) as a subprocess writing its whole JSON report into the
studio's folder; shown as the CLI prints its table (the same JSON through the same formatter),
with the items on which the models disagree."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agiasi.studio.runs import STATE_DIR, _read_json, last_error_line, launch, pid_alive, tail_lines


def eval_dir(root: Path) -> Path:
    return root / STATE_DIR / "evals"


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"


def report_path(root: Path, eid: str) -> Path:
    return eval_dir(root) / f"{eid}.report.json"


def start_eval(root: Path, flags: list[str], positional: list[str], meta: dict[str, Any]) -> str:
    eid = new_id()
    report = report_path(root, eid)
    argv = ["eval", *positional, *flags, "--report", str(report.relative_to(root))]
    launch(root, eval_dir(root) / f"{eid}.json", eval_dir(root) / f"{eid}.log", argv,
           {"id": eid, **meta})  # fmt: skip
    return eid


def disagreements(report: dict[str, Any], limit: int = 50) -> list[dict[str, Any]]:
    """Items where the models' answers differ: what changed, item by item."""
    out = []
    for task, entry in report.get("tasks", {}).items():
        results = entry.get("results") or []
        if len(results) < 2:
            continue
        for items in zip(*(r["per_item"] for r in results), strict=True):
            picks = [it["pred"] for it in items]
            if len(set(picks)) > 1:
                first = items[0]
                out.append({"task": task, "id": first["id"], "gold": first["gold"],
                            "choices": first.get("choices"), "picks": picks,
                            "question": first["context"][-400:]})  # fmt: skip
                if len(out) >= limit:
                    return out
    return out


def eval_state(root: Path, eid: str, details: bool = False) -> dict[str, Any]:
    record = _read_json(eval_dir(root) / f"{eid}.json") or {}
    report = _read_json(report_path(root, eid))
    out: dict[str, Any] = {"id": eid, "command": record.get("command"), "error": None,
                           "models": record.get("models")}  # fmt: skip
    if pid_alive(record.get("pid")) and record.get("exit_code") is None:
        out["state"] = "running"
    elif record.get("exit_code") not in (None, 0) or (record and report is None):
        out["state"] = "failed" if record.get("exit_code") is not None else "stopped"
        out["error"] = last_error_line(eval_dir(root) / f"{eid}.log")
    else:
        out["state"] = "finished"
    if details:
        out["log"] = tail_lines(eval_dir(root) / f"{eid}.log", 30)
        if report is not None and report.get("kind") == "perplexity":
            from agiasi.eval.entry import format_perplexities

            out["table"] = format_perplexities(report)
            out["disagreements"] = []
            out["models"] = report.get("models")
        elif report is not None:
            from agiasi.eval.benchmark import format_benchmark

            out["table"] = format_benchmark(report)
            out["disagreements"] = disagreements(report)
            out["models"] = report.get("models")
    return out


def find_evals(root: Path) -> list[dict[str, Any]]:
    ids = sorted((p.stem for p in eval_dir(root).glob("*.json") if not p.stem.endswith(".report")),
                 reverse=True)  # fmt: skip
    return [eval_state(root, i) for i in ids]
