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
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise AgiasiError(f"{path} is not UTF-8 text (byte {e.start})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # a line cut by a crash
        if not isinstance(row, dict):
            continue
        missing = [k for k in ("step", "task_loss") if not isinstance(row.get(k), (int, float))]
        if row.get("alpha") is not None and not isinstance(row.get("gate"), (int, float)):
            missing.append("gate")
        if missing:
            raise AgiasiError(f"{path}: line {n} lacks {', '.join(missing)} (not agiasi metrics?)")
        rows.append(row)
    if not rows:
        raise AgiasiError(f"{path} has no metrics yet")
    return rows


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Loss; α and gate with the phases shaded; ‖R − I‖_F beside the orthogonality error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AgiasiError("plotting needs matplotlib: pip install matplotlib") from None
    own = Path(run_dir) / "phase_transition.png"
    out_path = Path(out) if out else own
    if out_path.is_dir():
        out_path = out_path / "phase_transition.png"
    if out is not None:  # the run's own plot is where the trainer writes it; nothing else in it
        from agiasi.outputs import check_output_file

        inputs = {"the run's metrics": Path(run_dir) / "metrics.jsonl"}
        check_output_file(out_path, "--out", inputs, own=[own])
    rows = read_metrics(run_dir)
    if not out_path.parent.is_dir():
        raise AgiasiError(f"cannot write the plot: {out_path.parent} is not a folder")
    has_rot = any(r.get("rotation_distance") is not None for r in rows)
    has_lr = any(isinstance(r.get("lr"), (int, float)) for r in rows)
    has_pairs = any(isinstance(r.get("margin"), (int, float)) for r in rows)
    n = 2 + has_rot + has_lr + has_pairs
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 + 1.9 * n), sharex=True)
    steps = [r["step"] for r in rows]
    _plot_loss(axes[0], rows, steps)
    if rows[0].get("alpha") is not None:
        _plot_gate(axes[0], axes[1], rows, steps)
    else:
        axes[1].text(
            0.5, 0.5, "control run (no soul)", ha="center", va="center", transform=axes[1].transAxes
        )
    if has_rot:
        _plot_rotation(axes[2], rows, steps)
    if has_pairs:
        _plot_rewards(axes[2 + has_rot], rows, steps)
    if has_lr:
        _plot_lr(axes[-1], rows, steps)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"agiasi: {Path(run_dir).name}")
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AgiasiError(f"cannot write the plot to {out_path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out_path


def _plot_loss(ax, rows: list[dict], steps: list[int]) -> None:
    """Training loss, and the validation loss where it was measured (with the best step)."""
    label = "task loss (CE)" if "margin" not in rows[0] else "preference loss"
    ax.plot(steps, [r["task_loss"] for r in rows], color="#333", lw=1.2, label=label)
    evals = [r for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            color="#fd7e14",
            lw=1.6,
            marker="o",
            ms=3,
            label="validation loss",
        )
        best = min(evals, key=lambda r: r["eval_loss"])
        ax.axvline(
            best["step"], color="#fd7e14", lw=0.8, ls="--", label=f"best step {best['step']}"
        )
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)


def _plot_rewards(ax, rows: list[dict], steps: list[int]) -> None:
    """A preference run: the chosen and rejected rewards, their margin, and on the right axis
    the share of pairs whose chosen answer wins (validation's as dots)."""
    for key, color in (("rewards/chosen", "#198754"), ("rewards/rejected", "#dc3545")):
        ax.plot(steps, [r.get(key) for r in rows], color=color, lw=1.2, label=key)
    ax.plot(steps, [r.get("margin") for r in rows], color="#333", lw=1.4, label="margin")
    ax.set_ylabel("reward")
    ax.legend(loc="upper left", fontsize=8)
    acc = ax.twinx()
    acc.plot(steps, [r.get("accuracy") for r in rows], color="#0d6efd", lw=0.8, alpha=0.6)
    evals = [r for r in rows if isinstance(r.get("eval_accuracy"), (int, float))]
    if evals:
        acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o",
                 color="#0d6efd", ms=3, label="validation accuracy")  # fmt: skip
        acc.legend(loc="lower right", fontsize=8)
    acc.set_ylim(-0.05, 1.05)
    acc.set_ylabel("accuracy", color="#0d6efd")


def _plot_lr(ax, rows: list[dict], steps: list[int]) -> None:
    """The learning rate's schedule (apart from α's)."""
    ax.plot(steps, [r.get("lr") for r in rows], color="#6f42c1", lw=1.4, label="learning rate")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(loc="upper right", fontsize=8)


def _plot_gate(ax_loss, ax_alpha, rows: list[dict], steps: list[int]) -> None:
    """α and the gate, with contiguous runs of one phase shaded on both panels."""
    ax_alpha.plot(steps, [r["alpha"] for r in rows], color="#0d6efd", lw=1.5, label="α")
    ax_gate = ax_alpha.twinx()
    ax_gate.plot(
        steps, [r["gate"] for r in rows], color="#dc3545", lw=1.2, ls="--", label="gate σ(α)"
    )
    ax_gate.set_ylabel("gate")
    ax_gate.set_ylim(0, 1)
    ax_alpha.set_ylabel("α")
    start, seen = 0, set()
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i]["phase"] != rows[start]["phase"]:
            color, label = PHASE_COLORS.get(rows[start]["phase"], ("#eee", rows[start]["phase"]))
            for ax in (ax_loss, ax_alpha):
                ax.axvspan(
                    steps[start] - 0.5,
                    steps[i - 1] + 0.5,
                    color=color,
                    alpha=0.6,
                    lw=0,
                    label=None if (label in seen or ax is ax_loss) else label,
                )
            seen.add(label)
            start = i
    ax_alpha.legend(loc="upper left", fontsize=8)
    ax_gate.legend(loc="lower right", fontsize=8)


def _plot_rotation(ax_rot, rows: list[dict], steps: list[int]) -> None:
    """Did the rotation learn anything? ‖R − I‖_F (how far it moved) beside the orthogonality
    error ‖RᵀR − I‖_F (≈ 0 by construction)."""
    ax_rot.plot(
        steps,
        [r.get("rotation_distance") for r in rows],
        color="#198754",
        lw=1.4,
        label="‖R − I‖_F (rotation moved)",
    )
    ax_rot.set_ylabel("‖R − I‖_F")
    ax_ortho = ax_rot.twinx()
    ax_ortho.plot(
        steps,
        [r.get("ortho_loss") for r in rows],
        color="#6c757d",
        lw=1.0,
        ls=":",
        label="‖RᵀR − I‖_F (orthogonality error)",
    )
    ax_ortho.set_ylabel("ortho error")
    ax_rot.legend(loc="upper left", fontsize=8)
    ax_ortho.legend(loc="lower right", fontsize=8)
