"""``agiasi demo``: the whole pipeline on the shipped tiny Japanese Phi-3, no network, no GPU.

inject → train (α moving through the phases) → checkpoint → export (HF + GGUF Q8_0/Q4_K_M) →
run the GGUF in llama.cpp → Japanese generations, the fidelity table, and held-out perplexity
before / after / after the same run with ``--no-soul`` (the control).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError
from agiasi.model.loading import Quantization
from agiasi.options import check, option
from agiasi.shipped import tiny_model_path

PROMPT = "Mew では、"  # the manual the demo trains on (sample_ja.txt); the base never saw it


@dataclass
class DemoConfig:
    """Flags of ``agiasi demo`` (all optional)."""

    out: str = option("agiasi_demo", "working folder (replaced each run)")
    max_steps: int = option(60, "training steps of each run", ge=4)
    batch_size: int = option(4, "sequences per step", ge=1)
    max_length: int = option(256, "tokens per sequence", ge=2)
    learning_rate: float = option(1e-3, "LoRA learning rate", gt=0.0)
    quantization: Quantization = option("nf4", "nf4 (QLoRA) or none")
    gguf: str = option("q8_0,q4_k_m", "GGUF types to export and run in llama.cpp")
    eval_tokens: int = option(4096, "held-out tokens to score", ge=2)
    control: bool = option(True, "also train the --no-soul control (plain QLoRA)")
    residual: bool = option(
        True, "also train with the design note's residual mix (h + g·R h), to see what it costs"
    )


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Timer(dict):
    """Seconds per demo stage."""

    def __call__(self, name: str, fn):
        t0 = time.time()
        result = fn()
        self[name] = time.time() - t0
        return result


def demo(cfg: DemoConfig, log=_say) -> dict[str, Any]:
    """inject → train (soul, control, the note's mix) → export → llama.cpp → report."""
    from agiasi.export.files import format_report
    from agiasi.gguf.arch import trained_context
    from agiasi.shipped import default_dataset, default_heldout

    check(cfg)
    t_start = time.time()
    out = _fresh_folder(Path(cfg.out))
    base, heldout = tiny_model_path(), default_heldout()
    timed = _Timer()
    # every window, context and n_ctx is the tiny model's trained context (256 tokens)
    context = trained_context(json.loads((base / "config.json").read_text()))

    def heldout_ppl(model: Path) -> dict[str, Any]:
        from agiasi.eval.perplexity import EvalConfig, evaluate

        ev = EvalConfig(
            model=str(model), text=str(heldout), window=context, max_tokens=cfg.eval_tokens
        )
        return evaluate(ev)

    log(f"demo: base model {base} (tiny Japanese Phi-3), data {default_dataset().name}")
    before = timed("eval_base", lambda: heldout_ppl(base))
    log(f"demo: held-out perplexity before injection {before['perplexity']:.2f}")
    ckpt = timed("train_soul", lambda: _train_run(cfg, base, out, "soul", log))
    after = timed("eval_soul", lambda: heldout_ppl(ckpt))
    control = residual = None
    if cfg.control:
        cckpt = timed(
            "train_control", lambda: _train_run(cfg, base, out, "control", log, soul=False)
        )
        control = timed("eval_control", lambda: heldout_ppl(cckpt))
    if cfg.residual:
        rckpt = timed(
            "train_residual",
            lambda: _train_run(cfg, base, out, "residual", log, soul_mix="residual"),
        )
        residual = timed("eval_residual", lambda: heldout_ppl(rckpt))
    report = timed("export", lambda: _export(cfg, ckpt, out, context, heldout, log))
    generation = _generations(out, report, context)
    runs = {"base": before, "soul": after, "control": control, "residual": residual}
    summary = _summary(cfg, runs, generation, ckpt, out, heldout, report)
    summary["seconds"] = {**timed, "total": time.time() - t_start}
    (out / "demo_report.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    print(format_summary(summary, format_report(report)))
    return summary


def _summary(cfg, runs, generation, ckpt: Path, out: Path, heldout: Path, report) -> dict:
    """demo_report.json: the config, every run's held-out perplexity, the generations, the
    files and the export report."""
    before, control, residual = runs["base"], runs["control"], runs["residual"]
    return {
        "config": asdict(cfg),
        "perplexity": {
            "base": before["perplexity"],
            "soul": runs["soul"]["perplexity"],
            "soul_mix": "convex",
            "control_no_soul": control["perplexity"] if control else None,
            "residual_mix": residual["perplexity"] if residual else None,
            "tokens": before["tokens"],
            "window": before["window"],
            "text": heldout.name,
        },
        "generation": generation,
        "files": {
            "checkpoint": str(ckpt),
            "export": str(out / "export"),
            "plot": str(out / "run_soul" / "phase_transition.png"),
            "report": str(out / "export" / "export_report.json"),
        },
        "seconds": {},
        "export_report": report,
    }


def _fresh_folder(out: Path) -> Path:
    """The demo's folder, replaced each run — but never a folder the demo did not make."""
    if out.exists():
        if not (out / "demo_report.json").exists() and any(out.iterdir()):
            raise AgiasiError(f"{out} exists and is not a previous demo folder; pick another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _train_run(cfg: DemoConfig, base: Path, out: Path, name: str, log, **options: Any) -> Path:
    """One training run of the demo (same data, seed and schedule for every run)."""
    from agiasi.train.loop import TrainConfig, train

    tc = TrainConfig(
        base_model=str(base),
        output_dir=str(out / f"run_{name}"),
        max_steps=cfg.max_steps,
        warmup_steps=max(1, cfg.max_steps // 8),
        annealing_steps=max(1, cfg.max_steps * 5 // 8),
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        learning_rate=cfg.learning_rate,
        save_steps=cfg.max_steps,
        quantization=cfg.quantization,
        # a tiny model on the CPU: memory is no concern, recomputation costs 20% a step
        gradient_checkpointing=False,
        seed=0,
        progress=True,
        **options,
    )
    return train(tc, log=log).final_checkpoint


def _export(cfg: DemoConfig, ckpt: Path, out: Path, context: int, heldout: Path, log):
    from agiasi.export import ExportConfig, export

    return export(
        ExportConfig(
            checkpoint=str(ckpt),
            out=str(out / "export"),
            dtype="float32",  # the tiny model is stored in bf16; fp32 shows the fold's exactness
            gguf=cfg.gguf,
            num_ctx=context,
            text=str(heldout),
            # the matrix on 64 chunks (not the default 256): the demo shows it, in seconds
            calibration_tokens=64 * min(context, 512),
        ),
        log=log,
    )


def _generations(out: Path, report: dict[str, Any], context: int) -> dict[str, str]:
    """Greedy Japanese continuations: the exported HF folder (as `agiasi generate` runs it)
    and the smallest GGUF in llama.cpp."""
    from agiasi.eval.models import GGUFModel
    from agiasi.generate import GenerateConfig, generate

    buf = io.StringIO()
    generate(
        GenerateConfig(model=str(out / "export" / "hf"), prompt=PROMPT, max_new_tokens=40), buf
    )
    gguf_name = report["files"].get("q4_k_m") or next(iter(report["files"].values()))
    g = GGUFModel(out / "export" / gguf_name, n_ctx=context)
    try:
        gg = g.llm.create_completion(PROMPT, max_tokens=40, temperature=0.0, repeat_penalty=1.1)
    finally:
        g.close()
    return {
        "prompt": PROMPT,
        "hf": buf.getvalue().strip(),
        f"gguf {gguf_name}": PROMPT + gg["choices"][0]["text"],
    }


def format_summary(s: dict[str, Any], fidelity: str) -> str:
    p = s["perplexity"]
    lines = [
        "",
        "== agiasi demo ==",
        f"held-out perplexity ({p['text']}, {p['tokens']} tokens, window {p['window']}):",
        f"  base model                                 {p['base']:.2f}",
        f"  after soul injection (convex mix, default) {p['soul']:.2f}",
    ]
    if p["control_no_soul"] is not None:
        lines.append(f"  control (--no-soul, plain QLoRA)           {p['control_no_soul']:.2f}")
    if p.get("residual_mix") is not None:
        lines.append(f"  the note's residual mix h + g·R h          {p['residual_mix']:.2f}")
    lines += ["", "generation (greedy):"]
    for k, v in s["generation"].items():
        if k != "prompt":
            # one line per model: a generated newline would look like the next line of output
            lines.append(f"  [{k}] " + " ⏎ ".join(line.rstrip() for line in str(v).splitlines()))
    lines += ["", "fidelity:", fidelity, "", "files:"]
    for k, v in s["files"].items():
        lines.append(f"  {k:<11} {v}")
    lines.append(f"\ntook {s['seconds']['total']:.0f} s")
    return "\n".join(lines)
