"""Stage 3 of an export: the GGUF files, and the importance matrix their quantizer is given.

F32/F16/BF16 come from the HF folder one tensor at a time (:mod:`agiasi.gguf.writer`); the K and IQ
types, and Q8_0 where llama.cpp's quantizer is installed, from an F16 file through llama.cpp's
quantizer (:mod:`agiasi.gguf.quantize`). Which of them get an importance matrix, and from where, is
decided in the plan (:func:`plan_imatrix`); the matrix is computed here from the written HF
folder (the merged + folded weights the GGUF holds) and saved as ``imatrix.gguf`` beside them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from agiasi.errors import AgiasiError
from agiasi.export.config import ExportConfig, ExportPlan

IMATRIX_FILE = "imatrix.gguf"


def _say(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def check_imatrix_flags(cfg: ExportConfig, types: list[str]) -> None:
    """What ``--imatrix`` and ``--calibration`` alone can get wrong, before anything is read."""
    from agiasi.gguf.file_types import GGUF_TYPE_TABLE
    from agiasi.gguf.quantize import needs_imatrix_message

    if cfg.imatrix == "none":
        need = [t for t in types if GGUF_TYPE_TABLE[t].needs_imatrix]
        if need:
            raise AgiasiError(needs_imatrix_message(need[0], "drop --imatrix none"))
        if cfg.calibration:
            raise AgiasiError(
                "--calibration is what the importance matrix is computed on; "
                "--imatrix none turns the matrix off"
            )
    elif cfg.imatrix != "auto":
        if cfg.calibration:
            raise AgiasiError(
                "--calibration computes an importance matrix; --imatrix FILE "
                "brings one already made: pass one of them"
            )
        if not Path(cfg.imatrix).is_file():
            raise AgiasiError(f"--imatrix {cfg.imatrix}: no such file (auto, none or a file)")


def imatrix_types(mode: str, types: list[str]) -> list[str]:
    """auto: the types at or below 4 bits; a file: every type llama.cpp quantizes (Q8_0 has no
    use for one); none: no type."""
    from agiasi.gguf.file_types import GGUF_TYPE_TABLE

    if mode == "none":
        return []
    if mode == "auto":
        return [t for t in types if GGUF_TYPE_TABLE[t].low_bit]
    return [t for t in types if GGUF_TYPE_TABLE[t].writer == "llama.cpp"]


def plan_imatrix(plan: ExportPlan, log=_say) -> ExportPlan:
    """The types that get the matrix, and its source: a given file checked against this
    model's tensors now, or the calibration text chosen now (a missing file fails here)."""
    from agiasi.export.calibration import choose_calibration
    from agiasi.gguf.file_types import GGUF_TYPE_TABLE
    from agiasi.gguf.imatrix import check_matches, gguf_names, read_imatrix

    cfg = plan.cfg
    with_matrix = imatrix_types(cfg.imatrix, plan.types)
    if cfg.imatrix == "none":
        low = [t for t in plan.types if GGUF_TYPE_TABLE[t].low_bit]
        if low:
            log(
                f"export: warning: {', '.join(low)} without an importance matrix lose more than "
                "they need to (llama.cpp: highly recommended at 4 bits and below)"
            )
        return plan
    if not with_matrix:
        return plan
    if cfg.imatrix != "auto":
        path = Path(cfg.imatrix)
        names = gguf_names(plan.hf_config.to_dict(), plan.shapes)
        shapes = {names[k]: s for k, s in plan.shapes.items() if k in names}
        given = read_imatrix(path)
        check_matches(given, shapes, str(path))
        return replace(plan, imatrix_types=with_matrix, imatrix_file=path, given_imatrix=given)
    cal = choose_calibration(cfg.calibration, plan.checkpoint, cfg.text)
    log(f"export: importance matrix for {', '.join(with_matrix)} on {cal.source}")
    return replace(plan, imatrix_types=with_matrix, calibration=cal)


def streamed_types(types: list[str]) -> list[str]:
    """The GGUF types written while the merged tensors stream into the HF folder: F32, F16, BF16
    and Q8_0 (agiasi.gguf.writer), plus F16 when llama.cpp's quantizer makes the K-quants from
    it."""
    from agiasi.gguf.file_types import KQUANT_TYPES

    from_f16 = [t for t in types if t in KQUANT_TYPES]
    direct = [t for t in types if t not in from_f16]
    return direct + (["f16"] if from_f16 and "f16" not in direct else [])


def write_ggufs(
    plan: ExportPlan, streamed: dict[str, Path], hf_dir: Path, folder: Path, log=_say
) -> tuple[dict[str, Path], dict[str, Any] | None]:
    """The quantized GGUF files from the streamed F16 (the importance matrix first, when asked),
    all of them; and what the matrix was (None when none was used). An F16 written only as the
    quantizer's source is removed."""
    from agiasi.gguf.quantize import quantize_gguf

    ggufs = dict(streamed)
    from_f16 = [t for t in plan.types if t not in ggufs]
    matrix, info = (
        importance_matrix(plan, hf_dir, folder, log) if plan.imatrix_types else (None, None)
    )
    for t in from_f16:
        start = time.perf_counter()
        out = folder / f"{plan.stem}-{t}.gguf"
        use = matrix if t in plan.imatrix_types else None
        ggufs[t] = quantize_gguf(ggufs["f16"], out, t, plan.cfg.output_tensor_type, use)
        log(
            f"export: {ggufs[t].name}"
            + (" (importance matrix)" if use else "")
            + f" ({time.perf_counter() - start:.1f} s)"
        )
    if "f16" in ggufs and "f16" not in plan.types:
        ggufs.pop("f16").unlink()
    return ggufs, info


def importance_matrix(plan: ExportPlan, hf_dir: Path, folder: Path, log=_say):
    """The matrix for the quantizer and its report entry: read from ``--imatrix FILE``, or
    computed on the calibration text and written to ``imatrix.gguf``."""
    from agiasi.gguf.imatrix import QuantizerImatrix, write_imatrix

    info: dict[str, Any] = {"types": list(plan.imatrix_types)}
    if plan.given_imatrix is not None:
        im = plan.given_imatrix
        info.update(file=str(plan.imatrix_file), source="--imatrix")
        name = plan.imatrix_file.name
    else:
        start = time.perf_counter()
        im = compute_for_export(plan, hf_dir, log)
        write_imatrix(folder / IMATRIX_FILE, im)
        info.update(
            file=IMATRIX_FILE,
            source=plan.calibration.source,
            seconds=round(time.perf_counter() - start, 2),
        )
        name = IMATRIX_FILE
        log(
            f"export: {IMATRIX_FILE} ({im.chunks} chunks of {im.chunk_size} tokens, "
            f"{info['seconds']:.1f} s)"
        )
    info.update(
        chunks=im.chunks,
        chunk_size=im.chunk_size,
        tokens=im.chunks * im.chunk_size,
        entries=len(im.sums),
    )
    return QuantizerImatrix(im, name), info


def compute_for_export(plan: ExportPlan, hf_dir: Path, log=_say):
    """The matrix of the written HF folder on the plan's calibration text, on the GPU where
    there is one; chunks of llama-imatrix's 512 tokens, or the model's context if shorter."""
    from transformers import AutoTokenizer

    from agiasi.export.calibration import calibration_text
    from agiasi.export.files import exported_config
    from agiasi.export.parity import measure_device
    from agiasi.gguf.arch import trained_context
    from agiasi.gguf.imatrix import DEFAULT_CHUNK, calibration_chunks, compute_imatrix, gguf_names
    from agiasi.weights import LazyWeights

    cfg = plan.cfg
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    text = calibration_text(plan.calibration, tok, cfg.calibration_tokens)
    context = trained_context(plan.hf_config.to_dict()) or DEFAULT_CHUNK
    chunk = min(DEFAULT_CHUNK, context, cfg.calibration_tokens // 2)
    chunks = calibration_chunks(tok, text, chunk, cfg.calibration_tokens)
    hf_cfg = exported_config(plan.hf_config, plan.dtype)
    names = gguf_names(hf_cfg.to_dict(), LazyWeights(hf_dir).keys())
    im = compute_imatrix(hf_dir, hf_cfg, chunks, names, measure_device(), log)
    im.datasets = [plan.calibration.source]
    return im


@contextmanager
def no_imatrix_controls(plan: ExportPlan, ggufs: dict[str, Path], log=_say):
    """Each type that got the matrix, quantized again without it, for the report's with /
    without rows; in a hidden folder inside the export, removed when the measure is done.
    Types llama.cpp refuses without a matrix have no control."""
    import shutil
    import tempfile

    from agiasi.gguf.file_types import GGUF_TYPE_TABLE
    from agiasi.gguf.quantize import quantize_gguf
    from agiasi.gguf.writer import write_gguf

    types = [t for t in plan.imatrix_types if not GGUF_TYPE_TABLE[t].needs_imatrix]
    if not types or not plan.cfg.measure:
        yield {}
        return
    tmp = Path(tempfile.mkdtemp(prefix=".no-imatrix-", dir=plan.out))
    try:
        src = ggufs.get("f16") or write_gguf(plan.out / "hf", tmp / "f16.gguf", "f16")
        controls = {}
        for t in types:
            controls[t] = quantize_gguf(
                src, tmp / f"{plan.stem}-{t}-no-imatrix.gguf", t, plan.cfg.output_tensor_type
            )
        log(f"export: {', '.join(types)} also quantized without the matrix, to measure it")
        yield controls
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def imatrix_effect(parity: dict[str, Any], types: list[str]) -> dict[str, Any]:
    """Per type, with and without the matrix: KL to the HF folder and top-1 agreement on
    held-out text (parity.HELDOUT_KL_TOKENS), perplexity, file size."""
    effect = {}
    for t in types:
        with_m, without = parity.get(f"gguf {t} vs hf"), parity.get(f"gguf {t} (no imatrix) vs hf")
        if not with_m or not without:
            continue
        row = {}
        for key in ("heldout_kl", "heldout_top1", "ppl", "size_bytes"):
            row[f"{key}_with"], row[f"{key}_without"] = with_m.get(key), without.get(key)
        if with_m.get("heldout_kl") is not None and without.get("heldout_kl"):
            row["kl_ratio"] = with_m["heldout_kl"] / without["heldout_kl"]
        effect[t] = row
    return effect
