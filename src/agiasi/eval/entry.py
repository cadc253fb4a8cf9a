"""``agiasi eval``'s one entry function: perplexity by default, JGLUE with ``--task`` (and
``--compare``), printed as a table or JSON; the CLI and any other front end call only this."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from agiasi.errors import AgiasiError
from agiasi.eval.perplexity import EvalConfig, evaluate
from agiasi.options import check


def run_eval(cfg: EvalConfig, out=print) -> None:
    """What ``agiasi eval`` prints for ``cfg``; errors are :class:`AgiasiError` lines."""
    if cfg.task:
        _tasks(cfg, out)
        return
    if cfg.compare:
        _perplexities(cfg, out)
        return
    if cfg.model is None:
        raise AgiasiError("eval: name a MODEL (a step folder, an HF folder or a .gguf file)")
    r = evaluate(cfg)
    if not math.isfinite(r["perplexity"]):
        raise AgiasiError(
            f"perplexity of {r['model']} is {r['perplexity']} on {r['text']}: the model's "
            "outputs are not finite (a checkpoint trained into nan/inf?)"
        )
    if cfg.json:
        out(json.dumps(r, ensure_ascii=False, indent=2))
    else:
        out(
            f"{r['kind']} {r['model']}\n  perplexity {r['perplexity']:.3f} on {r['tokens']} tokens of "
            f"{r['text']}\n  window {r['window']} tokens, stride {r['stride']} (non-overlapping), "
            f"{r['chars_per_token']:.2f} chars/token"
        )


def _perplexities(cfg: EvalConfig, out) -> None:
    """``--compare A,B,…`` without ``--task``: each model's perplexity on the same text, one
    model loaded at a time, with the ratio to the first (below 1: the text is likelier)."""
    from dataclasses import replace

    from agiasi.eval.perplexity import evaluate
    from agiasi.outputs import check_output_file

    check(cfg)
    models = [m.strip() for m in cfg.compare.split(",") if m.strip()]
    if len(models) < 2:
        raise AgiasiError("--compare needs at least two models: BASE,MODEL[,…]")
    if cfg.model:
        raise AgiasiError("--compare names every model itself; leave out the MODEL argument")
    inputs = {f"--compare {m}": m for m in models}
    report_path = check_output_file(cfg.report, "--report", inputs) if cfg.report else None
    rows = []
    for m in models:
        print(f"perplexity: {m}", file=sys.stderr, flush=True)
        r = evaluate(replace(cfg, model=m, compare=None, report=None))
        if not math.isfinite(r["perplexity"]):
            raise AgiasiError(f"perplexity of {m} is {r['perplexity']}: its outputs are not finite")
        rows.append(r)
    report = {"kind": "perplexity", "text": rows[0]["text"], "models": models, "rows": rows}
    if report_path is not None:
        tmp = report_path.with_name(f".{report_path.name}.tmp")
        tmp.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(report_path)
    if cfg.json:
        out(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        out(format_perplexities(report))
        if report_path is not None:
            out(f"report: {report_path}")


def format_perplexities(report: dict) -> str:
    """The perplexity comparison as the CLI prints it (and the studio shows it)."""
    rows = report["rows"]
    base = rows[0]["perplexity"]
    width = max(len(r["model"]) for r in rows)
    lines = [f"held-out perplexity on {report['text']}",
             f"{'model':<{width}}  {'kind':<10} {'perplexity':>10} {'× first':>8} {'tokens':>7} "
             f"{'chars/token':>11}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['model']:<{width}}  {r['kind']:<10} {r['perplexity']:>10.3f} "
            f"{r['perplexity'] / base:>8.3f} {r['tokens']:>7} {r['chars_per_token']:>11.2f}"
        )
    if len({r["tokens"] for r in rows}) > 1:
        lines.append("the tokenizers differ: compare perplexities per character, not per token")
    return "\n".join(lines)


def _tasks(cfg: EvalConfig, out) -> None:
    """``--task``: the JGLUE table, the JSON summary, the full report file."""
    from agiasi.eval.benchmark import eval_inputs, format_benchmark, run_benchmark, without_items
    from agiasi.outputs import check_output_file

    check(cfg)
    if not cfg.task:
        raise AgiasiError("--compare needs --task (the benchmark to compare the models on)")
    if cfg.text:
        raise AgiasiError("--text is for perplexity; --task scores the JGLUE items instead")
    report_path: Path | None = None
    if cfg.report:  # checked before an hour of scoring, and never an input of this command
        report_path = check_output_file(cfg.report, "--report", eval_inputs(cfg))
    report = run_benchmark(cfg, log=lambda m: print(m, file=sys.stderr))
    if report_path is not None:
        tmp = report_path.with_name(f".{report_path.name}.tmp")
        tmp.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(report_path)
    if cfg.json:
        out(json.dumps(without_items(report), ensure_ascii=False, indent=2))
    else:
        out(format_benchmark(report))
        if report_path is not None:
            out(f"report: {report_path}")
