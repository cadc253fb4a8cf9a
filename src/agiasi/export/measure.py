"""Stage 4 of an export: the fidelity measure on the finished folder, the ``--benchmark`` rows,
the report and the model card.

It runs after the folder is complete and renamed into place, so a measure that fails keeps the
export (complete and loadable); the report then says which stage failed and the command exits
non-zero. Models are opened one at a time (:mod:`agiasi.export.parity`), so the measure's memory is
one model's.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError
from agiasi.export.checks import REPORT
from agiasi.export.config import ExportPlan
from agiasi.export.files import (
    exported_config,
    failed_check,
    format_report,
    model_card,
    soul_record,
)
from agiasi.export.merge import MERGE_BASES
from agiasi.export.quant import imatrix_effect, no_imatrix_controls

CARD = "README.md"


def _say(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def base_report(
    plan: ExportPlan, ggufs: dict[str, Path], imatrix: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "checkpoint": str(plan.checkpoint),
        "base_model": plan.base_id,
        "merge_base": plan.cfg.merge_base,
        "soul": soul_record(plan.manifest),
        "num_ctx": plan.cfg.num_ctx,
        "files": {t: p.name for t, p in ggufs.items()},
        "sizes": {t: p.stat().st_size for t, p in ggufs.items()},
        "imatrix": imatrix,
        "measure": {"status": "pending" if plan.cfg.measure else "skipped (--no-measure)"},
    }


def finish_report(
    plan: ExportPlan, report: dict[str, Any], ggufs: dict[str, Path], tok, log=_say
) -> dict[str, Any]:
    """Run the fidelity measure on the finished export; a failure keeps the export."""
    from agiasi.export.parity import MeasureError, parity_report
    from agiasi.model.loading import release_memory

    if not plan.cfg.measure:
        log(f"export: done → {plan.out}")
        return report
    try:
        with no_imatrix_controls(plan, ggufs, log) as controls:
            inputs = parity_inputs(plan, ggufs, tok, log, controls)
            release_memory()  # what the write stages freed goes back before the models load
            measured = parity_report(inputs, log)
            if plan.cfg.benchmark:
                measured["benchmark"] = benchmark_rows(plan, inputs, log)
    except AgiasiError as e:
        if not isinstance(e, MeasureError):
            e = MeasureError("imatrix controls", str(e))
        report["measure"] = {"status": "failed", "stage": e.stage, "error": e.message}
        write_report_and_card(plan.out, report, plan)
        raise AgiasiError(
            f"the export in {plan.out} is complete and loadable, but its fidelity measure failed "
            f"at '{e.stage}': {e.message} (see {REPORT})"
        ) from None
    status = measured.pop("measure")
    report.update(measured)
    if report.get("imatrix"):
        report["imatrix"]["effect"] = imatrix_effect(measured["parity"], plan.imatrix_types)
    failure = failed_check(measured)
    if failure:
        stage, why = failure
        report["measure"] = {"status": "failed", "stage": stage, "error": why}
        write_report_and_card(plan.out, report, plan)
        log(format_report(report))
        raise AgiasiError(
            f"the export in {plan.out} failed its fidelity check: {why} (see {REPORT})"
        )
    report["measure"] = {"status": "done", **status}
    write_report_and_card(plan.out, report, plan)
    log(format_report(report))
    for note in status["skipped"]:
        log(f"export: not measured: {note}")
    log(f"export: done → {plan.out}")
    return report


def parity_inputs(plan: ExportPlan, ggufs: dict[str, Path], tok, log=_say, controls=None):
    """What the measure compares: the checkpoint, the written folder and GGUFs, and both merge
    bases where the checkpoint was trained on NF4 and two fp32 copies of it fit."""
    from agiasi.export.parity import COMPARE_MERGE_BASES_MAX_PARAMS, ParityInputs

    merge_plans = {}
    if plan.model_config.quantization == "nf4":
        if plan.n_params <= COMPARE_MERGE_BASES_MAX_PARAMS:
            merge_plans = {k: replace(plan.merge, merge_base=k) for k in MERGE_BASES}
        else:
            log(
                "export: merge bases not compared (two fp32 copies of this model); see docs/DESIGN.md"
            )
    return ParityInputs(
        checkpoint=plan.checkpoint,
        model_config=plan.model_config,
        hf_config=exported_config(plan.hf_config, plan.dtype),
        hf_dir=plan.out / "hf",
        ggufs=ggufs,
        controls=controls or {},
        tokenizer=tok,
        num_ctx=plan.cfg.num_ctx,
        text=plan.cfg.text,
        merge_base=plan.cfg.merge_base,
        n_params=plan.n_params,
        merge_plans=merge_plans,
        run_ggufs=plan.run_ggufs,
    )


def benchmark_rows(plan: ExportPlan, inputs, log=_say) -> dict[str, Any]:
    """``--benchmark``: the trained wrapper (as trained), the HF folder and each GGUF on the
    same JGLUE items, one model in memory at a time; a failure is the measure's failure."""
    from agiasi.eval.benchmark import export_rows
    from agiasi.eval.models import open_eval_model
    from agiasi.export.parity import MeasureError, gguf_stages, measure_device, parity_n_ctx

    device = str(measure_device())
    mcfg = plan.model_config
    stages = [
        (
            "wrapper (as trained)",
            lambda: open_eval_model(
                plan.checkpoint,
                base_model=mcfg.base_model,
                trust_remote_code=mcfg.trust_remote_code,
                device=device,
            ),
        ),
        ("hf", lambda: open_eval_model(plan.out / "hf", device=device)),
    ]
    if plan.run_ggufs:
        for t, path in gguf_stages(inputs).items():
            stages.append(
                (
                    f"gguf {t}",
                    lambda p=path: open_eval_model(p, n_ctx=parity_n_ctx(plan.cfg.num_ctx)),
                )
            )
    try:
        return export_rows(plan.cfg.benchmark, stages, log)
    except AgiasiError as e:
        raise MeasureError("benchmark", str(e)) from None
    except Exception as e:  # one failed row must not lose the export
        raise MeasureError("benchmark", f"{type(e).__name__}: {e}") from e


def write_report_and_card(folder: Path, report: dict[str, Any], plan: ExportPlan) -> None:
    for name, text in (
        (REPORT, json.dumps(report, ensure_ascii=False, indent=2) + "\n"),
        (CARD, model_card(report, plan.cfg)),
    ):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
