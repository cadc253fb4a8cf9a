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
    if cfg.task or cfg.compare:
        _tasks(cfg, out)
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
