"""``plot_run(run_dir)``: loss and α/gate over steps, phase bands shaded (a PNG)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from agiasi.errors import AgiasiError

PHASE_COLORS = {
    "🔵 Stable": ("#cfe2ff", "Stable"),
    "🟡 Transitioning": ("#fff3cd", "Transitioning"),
    "🟢 Golden Ratio Reached": ("#d1e7dd", "Golden ratio"),
    "🟣 Beyond": ("#e2d9f3", "Beyond"),
}


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise AgiasiError(
            f"no metrics.jsonl in {str(run_dir)!r} (is it an `agiasi train` output dir?)"
        )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    if not rows:
        raise AgiasiError(f"{path} has no metrics yet")
    return rows


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AgiasiError("plotting needs matplotlib: pip install matplotlib") from None
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    out_path = Path(out) if out else Path(run_dir) / "phase_transition.png"
    fig, (ax_loss, ax_alpha) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax_loss.plot(
        steps, [r["task_loss"] for r in rows], color="#333", lw=1.2, label="task loss (CE)"
    )
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    if rows[0].get("alpha") is not None:
        alphas = [r["alpha"] for r in rows]
        ax_alpha.plot(steps, alphas, color="#0d6efd", lw=1.5, label="α")
        ax_gate = ax_alpha.twinx()
        ax_gate.plot(
            steps, [r["gate"] for r in rows], color="#dc3545", lw=1.2, ls="--", label="gate σ(α)"
        )
        ax_gate.set_ylabel("gate")
        ax_gate.set_ylim(0, 1)
        ax_alpha.set_ylabel("α")
        # shade contiguous runs of one phase on both axes
        start = 0
        seen = set()
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i]["phase"] != rows[start]["phase"]:
                color, label = PHASE_COLORS.get(
                    rows[start]["phase"], ("#eee", rows[start]["phase"])
                )
                lo = steps[start] - 0.5
                hi = steps[i - 1] + 0.5
                for ax in (ax_loss, ax_alpha):
                    ax.axvspan(
                        lo,
                        hi,
                        color=color,
                        alpha=0.6,
                        lw=0,
                        label=None if (label in seen or ax is ax_loss) else label,
                    )
                seen.add(label)
                start = i
        ax_alpha.legend(loc="upper left", fontsize=8)
        ax_gate.legend(loc="lower right", fontsize=8)
    else:
        ax_alpha.text(
            0.5,
            0.5,
            "control run (no soul)",
            ha="center",
            va="center",
            transform=ax_alpha.transAxes,
        )
    ax_alpha.set_xlabel("step")
    fig.suptitle(f"agiasi: {Path(run_dir).name}")
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
