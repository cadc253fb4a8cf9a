"""``export(config)``: one plain model — LoRA merged, soul folded — as HF and GGUF, with proof.

Stages, each a function below:

1. :func:`plan_export` — every check that can fail, before anything is read in bulk or written:
   the checkpoint, the output path (never inside the checkpoint, its run or the base model),
   the base model's files, the optional dependencies the requested outputs need, free disk.
2. :func:`agiasi.export.hf.write_hf_folder` — the merged, folded weights streamed tensor by tensor from the
   base's safetensors into HF shards (:mod:`agiasi.export.merge`, :mod:`agiasi.weights`) and, on the
   same pass, into the F16/F32/BF16 GGUFs (:class:`agiasi.gguf.writer.GGUFStream`): memory holds
   about two tensors (the next one is merged while this one is written), never the model, and
   nothing is read back.
3. :func:`agiasi.export.quant.write_ggufs` — the importance matrix (:mod:`agiasi.gguf.imatrix`),
   then Q8_0 and the K and IQ quants from the F16 through llama.cpp's quantizer.
4. :func:`agiasi.export.measure.finish_report` — the fidelity measure (:mod:`agiasi.export.parity`,
   one model at a time), the ``--benchmark`` rows and the model card.

Stages 2–3 write into ``.OUT.tmp-<pid>``, renamed to ``OUT`` when complete
(:func:`agiasi.checkpoint.step_folder.atomic_folder`): a killed export leaves no folder that looks complete.
The measure runs after that: if it fails, the export stays (complete and loadable), its report
says which stage failed, and the command exits non-zero.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from agiasi.errors import AgiasiError
from agiasi.export.checks import (
    check_free_disk,
    check_keys_fit,
    check_output_path,
    check_special_ids,
    refuse_nonfinite,
)
from agiasi.export.config import ExportConfig, ExportPlan
from agiasi.export.files import exported_config, modelfile, modelfile_value, read_json
from agiasi.export.hf import write_hf_folder
from agiasi.export.measure import base_report, finish_report, write_report_and_card
from agiasi.export.merge import (
    MergePlan,
    SoulFold,
    lora_pairs,
    rotation_from_state,
)
from agiasi.export.quant import check_imatrix_flags, plan_imatrix, write_ggufs
from agiasi.options import check
from agiasi.weights import LazyWeights, check_plain


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(cfg: ExportConfig, log=_say) -> dict[str, Any]:
    """Merge, fold, write HF + GGUF + Modelfile + card + report into ``cfg.out``."""
    from agiasi.process import gc_paused

    with gc_paused():
        plan = plan_export(cfg, log)
        with _output_lock(plan.out):
            return _export(plan, cfg, log)


@contextmanager
def _output_lock(out: Path):
    """One export into a folder at a time (two at once left one's model with the other's
    report); the lock sits beside the folder, since the folder itself is renamed into place."""
    from filelock import FileLock, Timeout

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.export.lock"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise AgiasiError(
            f"another `agiasi export` is writing {out}; wait for it or pick another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()
        path.unlink(missing_ok=True)


def _export(plan: ExportPlan, cfg: ExportConfig, log) -> dict[str, Any]:
    from agiasi.checkpoint.step_folder import atomic_folder, clean_stale_temp

    for stale in clean_stale_temp(plan.out):
        log(f"export: removed {stale.name}, left half-written by a killed export")
    with atomic_folder(plan.out, log=lambda m: log(f"export: {m}")) as tmp:
        tok, streamed = write_hf_folder(plan, tmp / "hf", tmp, log)
        ggufs, imatrix = write_ggufs(plan, streamed, tmp / "hf", tmp, log)
        report = base_report(plan, ggufs, imatrix)
        (tmp / "Modelfile").write_text(modelfile(tok, ggufs, plan.cfg.num_ctx), encoding="utf-8")
        write_report_and_card(tmp, report, plan)
        if plan.out.exists() and not cfg.force:  # something else made it since the plan
            raise AgiasiError(
                f"{plan.out} appeared while this export ran; nothing was replaced (pass --force "
                "to replace an earlier export)"
            )
    ggufs = {t: plan.out / p.name for t, p in ggufs.items()}
    return finish_report(plan, report, ggufs, tok, log)


# --------------------------------------------------------------------------- 1. plan


def plan_export(cfg: ExportConfig, log=_say) -> ExportPlan:
    """Check everything that can be checked before the work; nothing is written here."""
    from agiasi.architectures import gguf_architecture
    from agiasi.checkpoint.step_folder import check_same_base, check_same_weights
    from agiasi.gguf.arch import GEMMA_HEAD_MESSAGE, trained_context
    from agiasi.gguf.file_types import KQUANT_TYPES
    from agiasi.model.loading import load_config

    types = check_flags(cfg)
    ckpt, manifest, mcfg = _checkpoint_of(cfg, log)
    base_id = mcfg.base_model
    out = Path(cfg.out)
    imatrix_file = cfg.imatrix if cfg.imatrix not in ("auto", "none") else None
    inputs = {
        "the --text file": cfg.text,
        "the --imatrix file": imatrix_file,
        "the --calibration data": cfg.calibration,
    }
    check_output_path(out, ckpt, base_id, cfg.force, inputs)
    hf_cfg = load_config(base_id, mcfg.trust_remote_code)
    check_same_base(manifest, ckpt, base_id, hf_cfg)
    check_same_weights(manifest, ckpt, base_id)
    context = trained_context(hf_cfg.to_dict())
    if context and cfg.num_ctx > context:
        log(f"export: num_ctx {cfg.num_ctx} → {context}, the context {base_id} was trained on")
        cfg = replace(cfg, num_ctx=context)
    arch = gguf_architecture(hf_cfg.model_type) if types else None  # fail before any work
    base_dir = local_model_dir(base_id)
    if arch is not None:
        _check_gguf_writable(arch, base_dir, hf_cfg)
        if arch.gguf_tied_head_only and manifest.soul is not None:
            raise AgiasiError(GEMMA_HEAD_MESSAGE)
    cfg = _resolve_merge_base(cfg, mcfg.quantization)
    run_ggufs = preflight_dependencies(cfg, types, mcfg, KQUANT_TYPES)
    merge = merge_plan(
        ckpt, manifest, hf_cfg, base_dir, cfg.merge_base, export_dtype(cfg.dtype, hf_cfg)
    )
    dtype = merge.dtype
    shapes = merge.output_shapes()
    check_plain(shapes)
    check_keys_fit(shapes, exported_config(hf_cfg, dtype))
    n_params = sum(math.prod(s) for s in shapes.values())
    check_free_disk(out, n_params, dtype, types)
    check_special_ids(hf_cfg, shapes)
    plan = ExportPlan(
        cfg=cfg,
        checkpoint=ckpt,
        manifest=manifest,
        model_config=mcfg,
        base_id=base_id,
        base_dir=base_dir,
        hf_config=hf_cfg,
        dtype=dtype,
        types=types,
        out=out,
        merge=merge,
        shapes=shapes,
        n_params=n_params,
        run_ggufs=run_ggufs,
    )
    plan = plan_imatrix(plan, log)
    for t in types:  # the GGUF file names go into the Modelfile's FROM line
        modelfile_value(f"./{plan.stem}-{t}.gguf", "the GGUF file name", bare=True)
    return plan


def _checkpoint_of(cfg: ExportConfig, log) -> tuple[Path, Any, Any]:
    """The step folder (a run folder's ``--step``), its manifest, and the model options it
    records with this command's overrides."""
    from agiasi.checkpoint.run_folder import is_run_folder, resolve_step
    from agiasi.checkpoint.step_folder import read_manifest
    from agiasi.model.config import ModelConfig, checkpoint_model_config

    ckpt = Path(cfg.checkpoint)
    if cfg.step is not None or is_run_folder(ckpt):
        ckpt = resolve_step(ckpt, cfg.step or "last")
        log(f"export: {ckpt} (--step {cfg.step or 'last'})")
    manifest = read_manifest(ckpt)
    overrides: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.base_model:
        overrides["base_model"] = cfg.base_model
    return ckpt, manifest, ModelConfig.from_dict(checkpoint_model_config(manifest, ckpt, overrides))


def _resolve_merge_base(cfg: ExportConfig, quantization: str) -> ExportConfig:
    if cfg.merge_base == "auto":
        # Measured (report "merge_bases", docs/DESIGN.md): the LoRA learned its delta against
        # the NF4-dequantized weights; merging into those reproduces the trained model closer.
        return replace(cfg, merge_base="nf4" if quantization == "nf4" else "w16")
    if cfg.merge_base == "nf4" and quantization != "nf4":
        raise AgiasiError("--merge-base nf4 only makes sense for a checkpoint trained with NF4")
    return cfg


def check_flags(cfg: ExportConfig) -> list[str]:
    """What the flags alone can get wrong (types, combinations, the --text file, the
    --benchmark spec), before anything is read: the GGUF types asked for."""
    from agiasi.eval.perplexity import eval_text
    from agiasi.gguf.file_types import parse_types

    check(cfg)
    if not cfg.out or not str(cfg.out).strip():
        raise AgiasiError("--out is required: the folder the export is written to")
    types = parse_types(cfg.gguf) if cfg.gguf else []
    if cfg.output_tensor_type and not types:
        raise AgiasiError("--output-tensor-type sets a GGUF's head type, but --gguf asks for none")
    if cfg.text and not cfg.measure:
        raise AgiasiError("--text is what the fidelity measure scores; --no-measure skips it")
    if cfg.measure:
        eval_text(cfg.text)  # a missing or unreadable --text fails now, not after the export
    if cfg.benchmark:
        from agiasi.eval.benchmark import parse_export_spec

        if not cfg.measure:
            raise AgiasiError("--benchmark is part of the fidelity measure; --no-measure skips it")
        parse_export_spec(cfg.benchmark)  # a typo fails now, not after the export
    if cfg.output_tensor_type:
        parse_types(cfg.output_tensor_type)
    check_imatrix_flags(cfg, types)
    return types


def _check_gguf_writable(arch, base_dir: Path, hf_cfg) -> None:
    """What the GGUF writer would refuse, refused now rather than after the merge: the vocabulary
    it needs is there and llama.cpp can reproduce it (a byte-level BPE whose pre-tokenizer
    llama.cpp does not know), and the writer takes this config (RoPE type, query scaling)."""
    from agiasi.architectures import vocabulary_kind
    from agiasi.gguf.arch import writer_for
    from agiasi.gguf.vocab import bpe_pre_tokenizer

    if vocabulary_kind(arch, base_dir) == "bpe":
        bpe_pre_tokenizer(read_json(base_dir / "tokenizer.json"))
    writer_for(arch).check(hf_cfg.to_dict(), LazyWeights(base_dir))


def merge_plan(
    ckpt: Path, manifest: dict, hf_cfg, base_dir: Path, merge_base: str, dtype: torch.dtype
) -> MergePlan:
    """What the stream merges: the base's tensors (read lazily), the LoRA pairs, the soul."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from agiasi.checkpoint.step_folder import (
        ADAPTER_WEIGHTS,
        SOUL_PT,
        check_soul_state,
        read_lora_config,
        safe_torch_load,
    )

    lora_cfg = read_lora_config(ckpt)
    try:
        adapter = load_file(str(ckpt / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise AgiasiError(f"{ckpt / ADAPTER_WEIGHTS} is not readable: {e}") from None
    refuse_nonfinite(adapter.items(), ckpt / ADAPTER_WEIGHTS)
    soul = None
    if manifest.soul is not None:
        state = check_soul_state(safe_torch_load(ckpt / SOUL_PT), ckpt / SOUL_PT)
        tensors = {"alpha": state["alpha"], **(state["so8_rotation"] or {})}
        refuse_nonfinite(tensors.items(), ckpt / SOUL_PT)
        soul = SoulFold(
            rotation_from_state(manifest.soul, state), float(state["alpha"]), manifest.mix
        )
    tied = bool(getattr(hf_cfg, "tie_word_embeddings", False))
    if hasattr(hf_cfg, "get_text_config"):
        tied = tied or bool(getattr(hf_cfg.get_text_config(), "tie_word_embeddings", False))
    return MergePlan(
        base=LazyWeights(base_dir),
        lora=lora_pairs(adapter, int(lora_cfg["r"])),
        scaling=float(lora_cfg["lora_alpha"]) / float(lora_cfg["r"]),
        merge_base=merge_base,
        dtype=dtype,
        tied=tied,
        soul=soul,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def preflight_dependencies(cfg: ExportConfig, types: list[str], mcfg, kquants) -> bool:
    """Optional libraries the requested outputs need; returns whether GGUFs can be run."""
    import importlib.util

    def have(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    if types and not have("gguf"):
        raise AgiasiError("writing GGUF needs the gguf package: pip install gguf")
    from agiasi.gguf.quantize import have_quantizer

    llama_cpp = have_quantizer()
    wanted_k = [t for t in types if t in kquants]
    if wanted_k and not llama_cpp:
        raise AgiasiError(
            f"{', '.join(t.upper() for t in wanted_k)} needs llama.cpp's quantizer: "
            "pip install llama-cpp-python (F32/F16/BF16/Q8_0 need only the gguf package)"
        )
    needs_bnb = cfg.merge_base == "nf4" or (cfg.measure and mcfg.quantization == "nf4")
    if needs_bnb and not have("bitsandbytes"):
        raise AgiasiError(
            "this NF4 checkpoint's export needs bitsandbytes (the NF4 merge base and the trained "
            "model in the measure): pip install bitsandbytes, or --merge-base w16 --no-measure"
        )
    return llama_cpp


def local_model_dir(base_id: str) -> Path:
    """The base model's files on disk: a local folder, or the hub cache (downloaded if allowed)."""
    path = Path(base_id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                base_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"],
            )
        )
    except Exception as e:
        raise AgiasiError(
            f"could not get the files of {base_id!r}: {str(e).splitlines()[0] if str(e) else e} "
            "(no network? pass a local folder with --base-model)"
        ) from None


def export_dtype(name: str, hf_cfg) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
