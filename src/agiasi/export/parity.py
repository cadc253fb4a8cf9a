"""Fidelity of every export stage: the trained wrapper, the merged HF folder, each GGUF.

One model in memory at a time: each stage loads its model, keeps only its logits on the parity
prompts (a few KB), and frees it before the next one loads — a 3.8 B model in fp32 is 15 GB.
The PyTorch models run on the GPU when there is one (weights go straight to it, not through
host memory), the GGUFs in llama.cpp on the CPU.

Rows of the report (``export_report.json``):

* ``wrapper_fp32 vs hf``: the unmerged wrapper (LoRA + soul, fp32, over the same base weights
  the merge used) against the merged + folded HF folder — the exactness of merge and fold.
* ``hf``: perplexity of the HF folder on held-out text.
* ``gguf T vs hf``: each GGUF in llama.cpp against the HF folder (max |Δlogit|, relative to the
  logit range, top-1 agreement, mean KL, greedy tokens, tokenization, perplexity).
* ``merge_bases`` (NF4 checkpoints of small models): both merge bases against the wrapper as
  trained (NF4), which is how the default merge base was chosen.
* ``long_context`` (LongRoPE): the GGUF with the model's full context, where llama.cpp switches
  to the long factors while HF does not (see docs/DESIGN.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agiasi.errors import AgiasiError
from agiasi.model.loading import release_memory

PARITY_PROMPTS = [
    "日本語の文章を生成します。",
    "Debian パッケージを作成する手順を説明してください。",
    "このコマンドはファイルの一覧を表示します。",
    "今日はとても良い天気ですね。",
]
# Comparing both merge bases needs two fp32 copies of the model; above this size it is skipped
# (the choice rests on the small-model measurements, docs/DESIGN.md).
COMPARE_MERGE_BASES_MAX_PARAMS = 1_500_000_000


class MeasureError(AgiasiError):
    """A measure stage failed; the exported model is complete, only its report is not."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


# --------------------------------------------------------------------------- comparing logits


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max |Δ|, Δ relative to ref's logit range, top-1 agreement, mean KL(ref ‖ got)."""
    from agiasi.eval.perplexity import log_softmax_np

    lp, lq = log_softmax_np(ref), log_softmax_np(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    rng = float(ref.max() - ref.min()) or 1.0
    return {
        "max_abs_dlogit": float(diff.max()),
        "rel_dlogit": float(diff.max() / rng),
        "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
    }


def aggregate(rows: list[dict[str, float]]) -> dict[str, float]:
    """Worst max |Δ| over prompts, mean agreement and KL."""
    return {
        "max_abs_dlogit": max(r["max_abs_dlogit"] for r in rows),
        "rel_dlogit": max(r["rel_dlogit"] for r in rows),
        "top1": float(np.mean([r["top1"] for r in rows])),
        "mean_kl": float(np.mean([r["mean_kl"] for r in rows])),
    }


def compare_all(refs: list[np.ndarray], gots: list[np.ndarray]) -> dict[str, float]:
    return aggregate([compare_logits(a, b) for a, b in zip(refs, gots, strict=True)])


# --------------------------------------------------------------------------- the measure


@dataclass
class ParityInputs:
    """What the measure compares; the export fills it after the model files are written."""

    checkpoint: Path
    model_config: Any  # agiasi.model.wrapper.ModelConfig, base model resolved
    hf_config: Any  # the exported (untied) transformers config
    hf_dir: Path
    ggufs: dict[str, Path]
    tokenizer: Any
    num_ctx: int
    text: str | None
    merge_base: str
    n_params: int  # counted by the export plan from the shapes it writes
    merge_plans: dict[str, Any] = field(default_factory=dict)  # kind → MergePlan (small models)
    run_ggufs: bool = True
    controls: dict[str, Path] = field(default_factory=dict)  # type → quantized without imatrix


def gguf_stages(inp: ParityInputs) -> dict[str, Path]:
    """The GGUFs the measure runs: each written file, then each no-imatrix control."""
    return {**inp.ggufs, **{f"{t} (no imatrix)": p for t, p in inp.controls.items()}}


# llama.cpp sizes its KV cache and (with all logits) its output buffer by n_ctx: 4096 tokens of
# Phi-3.5-mini cost 1.6 GB + 0.5 GB beside its 7.6 GB of F16 weights. The parity prompts and the
# 512-token perplexity windows need far less, and for LongRoPE any context within the original
# window selects the same (short) factors, so parity runs at most at this context.
PARITY_MAX_N_CTX = 512


def parity_n_ctx(num_ctx: int) -> int:
    return min(num_ctx, PARITY_MAX_N_CTX)


def long_context_n_ctx(cfg: dict[str, Any], num_ctx: int) -> int:
    """A context just past LongRoPE's original window — where llama.cpp switches to the long
    factors — not the model's maximum (131,072 for Phi-3.5-mini: a 51 GB KV cache)."""
    from agiasi.gguf.arch import trained_context

    original = trained_context(cfg) or num_ctx
    maximum = int(cfg.get("max_position_embeddings") or 2 * original)
    return min(maximum, original + 256)  # llama.cpp pads contexts to multiples of 256


def memory_note() -> str:
    """`` [peak RSS …]`` for the log when ``AGIASI_MEMLOG`` is set (benchmarks), else ''."""
    if not os.environ.get("AGIASI_MEMLOG"):
        return ""
    try:
        with open("/proc/self/status") as fh:
            kib = {ln.split(":")[0]: int(ln.split()[1]) for ln in fh if ln.startswith("Vm")}
        return f" [RSS {kib['VmRSS'] / 2**20:.2f} GiB, peak {kib['VmHWM'] / 2**20:.2f} GiB]"
    except (OSError, KeyError, ValueError):
        return ""


def measure_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def measure_dtype(n_params: int, device: torch.device) -> torch.dtype | None:
    """float32 where a copy fits (the fold is checked exactly), else bf16 on a GPU, else None:
    the model is too large to run here and the PyTorch rows are skipped."""
    free = _free_bytes(device)
    if free is None or n_params * 4 * 1.25 < free:
        return torch.float32
    if device.type == "cuda" and n_params * 2 * 1.25 < free:
        return torch.bfloat16
    return None


def _wrapper_logits(inp: ParityInputs, prompts, device, dtype, as_trained: bool) -> list:
    """Logits of the wrapper: as trained (NF4 if it was), or in ``dtype`` over the same base
    weights the merge used (NF4-dequantized for ``--merge-base nf4``)."""
    from agiasi.export.merge import nf4_roundtrip
    from agiasi.model.wrapper import AGIASI_SO8T_Wrapper

    mcfg = inp.model_config
    common = dict(
        device=device,
        lora_dropout=0.0,
        base_model=mcfg.base_model,
        trust_remote_code=mcfg.trust_remote_code,
    )
    decoder = None
    if as_trained:
        wrapper = AGIASI_SO8T_Wrapper.from_checkpoint(inp.checkpoint, **common).eval()
    else:
        name = str(dtype).removeprefix("torch.")
        wrapper = AGIASI_SO8T_Wrapper.from_checkpoint(
            inp.checkpoint, quantization="none", dtype=name, **common
        ).eval()
        if inp.merge_base == "nf4":
            decoder = getattr(wrapper.causal_lm, wrapper.causal_lm.base_model_prefix)
            with torch.no_grad():
                for mod_name, module in decoder.named_modules():
                    if isinstance(module, torch.nn.Linear) and "lora_" not in mod_name:
                        module.weight.copy_(nf4_roundtrip(module.weight))
    with torch.no_grad():
        out = [
            wrapper(torch.tensor([p], device=device)).logits[0].float().cpu().numpy()
            for p in prompts
        ]
    del wrapper, decoder
    release_memory()
    return out


@dataclass
class _Run:
    """What the stages share: the inputs, the tokenized prompts, the report being filled."""

    inp: ParityInputs
    prompts: list[list[int]]
    report: dict[str, Any]
    log: Any
    hf_logits: list | None = None
    greedy_hf: list[int] | None = None
    ids: list[int] | None = None
    window: int = 512
    heldout_logits: list = field(default_factory=list)  # the HF folder's, first windows

    def skip(self, what: str) -> None:
        self.report["measure"]["skipped"].append(what)


def parity_report(inp: ParityInputs, log) -> dict[str, Any]:
    """Every fidelity number of the export, one model in memory at a time; a stage that fails
    raises :class:`MeasureError` naming it."""
    tok = inp.tokenizer
    device = measure_device()
    n_params = inp.n_params
    dtype = measure_dtype(n_params, device)
    run = _Run(
        inp=inp,
        prompts=[tok(p, add_special_tokens=False)["input_ids"] for p in PARITY_PROMPTS],
        log=log,
        report={
            "parity": {},
            "measure": {
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch.") if dtype else None,
                "hf_weights": str(getattr(inp.hf_config, "dtype", "")).removeprefix("torch."),
                "skipped": [],
            },
        },
    )
    stages = [
        ("merge bases", lambda: _merge_base_rows(run, device)),
        ("wrapper vs hf", lambda: _wrapper_and_hf_rows(run, device, dtype, n_params)),
        ("gguf", lambda: _gguf_rows(run)),
        ("long context", lambda: _long_context_row(run)),
    ]
    for stage, fn in stages:
        try:
            fn()
        except MeasureError:
            raise
        except AgiasiError as e:
            raise MeasureError(stage, str(e)) from None
        except Exception as e:  # an unexpected failure of one stage must not lose the export
            raise MeasureError(stage, f"{type(e).__name__}: {e}") from e
    return run.report


def _merge_base_rows(run: _Run, device: torch.device) -> None:
    """Both merge bases against the wrapper as trained (small NF4 models only)."""
    from transformers import AutoModelForCausalLM

    from agiasi.eval.models import hf_logits
    from agiasi.export.merge import merged_tensors

    if not run.inp.merge_plans:
        return
    trained = _wrapper_logits(run.inp, run.prompts, device, None, as_trained=True)
    run.report["merge_bases"] = {}
    for kind, plan in run.inp.merge_plans.items():
        m = AutoModelForCausalLM.from_config(run.inp.hf_config, dtype=torch.float32).eval()
        params = m.state_dict()
        with torch.no_grad():  # streamed in: one merged tensor at a time
            for key, t in merged_tensors(plan):
                params[key].copy_(t)
        run.report["merge_bases"][kind] = compare_all(
            trained, [hf_logits(m, p) for p in run.prompts]
        )
        del m, params
        release_memory()
    run.log("export: measured both merge bases" + memory_note())


def _wrapper_and_hf_rows(run: _Run, device, dtype, n_params: int) -> None:
    """The unmerged wrapper against the HF folder, then the HF folder's perplexity."""
    from agiasi.eval.models import hf_greedy, hf_logits
    from agiasi.eval.perplexity import perplexity, text_ids

    if dtype is None:
        run.skip(
            f"wrapper vs hf and hf perplexity: a {n_params / 1e9:.1f} B model does not fit in "
            f"the free memory of {device}"
        )
        return
    w_l = _wrapper_logits(run.inp, run.prompts, device, dtype, as_trained=False)
    hf = load_model(run.inp.hf_dir, run.inp.hf_config, dtype, device)
    run.hf_logits = [hf_logits(hf, p) for p in run.prompts]
    name = "wrapper_fp32 vs hf" if dtype == torch.float32 else "wrapper_bf16 vs hf"
    run.report["parity"][name] = compare_all(w_l, run.hf_logits)
    run.log(f"export: measured the HF folder against the wrapper ({name})" + memory_note())
    ids, cpt = text_ids(run.inp.tokenizer, run.inp.text)
    run.ids, run.window = ids, min(run.inp.num_ctx, 512)
    run.report["eval_text"] = {"tokens": len(ids), "chars_per_token": cpt, "window": run.window}
    kept = _FirstWindows(partial(hf_logits, hf))
    run.report["parity"]["hf"] = {"ppl": perplexity(kept, ids, run.window)}
    run.heldout_logits = kept.logits
    run.greedy_hf = hf_greedy(hf, run.prompts[0], 32)
    del hf
    release_memory()


# Tokens of held-out text on which each GGUF's KL to the HF folder is measured: the logits of
# the perplexity windows that start below it are kept (1024 × a 152k vocabulary in fp32 is
# 620 MB; the tiny model's 16 MB), so no window is evaluated twice.
HELDOUT_KL_TOKENS = 1024


class _FirstWindows:
    """A logits function that keeps its outputs for the windows of the first
    :data:`HELDOUT_KL_TOKENS` tokens, as :func:`agiasi.eval.perplexity.perplexity` calls it in order."""

    def __init__(self, fn):
        self.fn, self.logits, self.seen = fn, [], 0

    def __call__(self, ids: list[int]):
        out = self.fn(ids)
        if self.seen < HELDOUT_KL_TOKENS:
            self.logits.append(out)
        self.seen += len(ids)
        return out


def _gguf_rows(run: _Run) -> None:
    """Each GGUF in llama.cpp against the HF folder."""
    from agiasi.eval.models import GGUFModel
    from agiasi.eval.perplexity import perplexity

    inp = run.inp
    if not inp.ggufs:
        return
    if not inp.run_ggufs:
        return run.skip("gguf rows: running a GGUF needs llama-cpp-python")
    if run.hf_logits is None:
        return run.skip("gguf rows: they compare against the HF folder, which was skipped")
    for t, path in gguf_stages(inp).items():
        g = GGUFModel(path, n_ctx=parity_n_ctx(inp.num_ctx))
        try:
            row = compare_all(run.hf_logits, [g.logits(p) for p in run.prompts])
            row["greedy_equal"] = g.greedy(run.prompts[0], 32) == run.greedy_hf
            # the same ids as the HF tokenizer, bare and with the specials each side adds
            row["tokens_equal"] = all(
                g.tokenize(s) == p
                and g.tokenize(s, add_special=True) == inp.tokenizer(s)["input_ids"]
                for s, p in zip(PARITY_PROMPTS, run.prompts, strict=True)
            )
            kept = _FirstWindows(g.logits)
            row["ppl"] = perplexity(kept, run.ids, run.window)
            row["size_bytes"] = path.stat().st_size
            if run.heldout_logits:  # KL on held-out text: the prompts are a few dozen tokens
                held = compare_all(run.heldout_logits, kept.logits)
                row["heldout_kl"], row["heldout_top1"] = held["mean_kl"], held["top1"]
        finally:
            g.close()
        run.report["parity"][f"gguf {t} vs hf"] = row
        run.log(f"export: measured {path.name}" + memory_note())


def _long_context_row(run: _Run) -> None:
    """LongRoPE: llama.cpp switches to the long factors past the original window, HF not."""
    from agiasi.eval.models import GGUFModel
    from agiasi.gguf.arch import rope_scaling_of

    inp = run.inp
    cfg = inp.hf_config.to_dict()
    # the smallest near-lossless GGUF: its KV cache for the long context comes on top
    ref_t = next((t for t in ("q8_0", "f16", "bf16", "f32") if t in inp.ggufs), None)
    if rope_scaling_of(cfg) is None or ref_t is None or run.hf_logits is None or not inp.run_ggufs:
        return
    n_ctx = long_context_n_ctx(cfg, inp.num_ctx)
    g = GGUFModel(inp.ggufs[ref_t], n_ctx=n_ctx)
    try:
        rows = [g.logits(p) for p in run.prompts]
    finally:
        g.close()
    run.report["long_context"] = {"n_ctx": n_ctx, "gguf": ref_t, **compare_all(run.hf_logits, rows)}


def load_model(folder: Path, hf_config, dtype: torch.dtype, device: torch.device):
    """An HF folder's model on ``device`` (see :func:`agiasi.model.loading.open_model`: streamed to a
    GPU, ``from_pretrained`` on the CPU, which skips the random initialisation a model built in
    place would pay there)."""
    from agiasi.model.loading import open_model

    return open_model(folder, dtype, device, hf_config=hf_config, what="the exported model")
