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

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agiasi.errors import AgiasiError

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


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max |Δ|, Δ relative to ref's logit range, top-1 agreement, mean KL(ref ‖ got)."""
    lp, lq = _log_softmax_np(ref), _log_softmax_np(got)
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
    model_config: Any  # agiasi.model.ModelConfig, base model resolved
    hf_config: Any  # the exported (untied) transformers config
    hf_dir: Path
    ggufs: dict[str, Path]
    tokenizer: Any
    num_ctx: int
    text: str | None
    merge_base: str
    merge_plans: dict[str, Any] = field(default_factory=dict)  # kind → MergePlan (small models)
    run_ggufs: bool = True


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
    from agiasi.gguf import trained_context

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


def release_memory() -> None:
    """Give a freed model's memory back (call after ``del model``): collect its reference cycles,
    empty the CUDA cache, and on glibc return the freed heap to the OS — tensors under 32 MB come
    from the heap, which glibc keeps otherwise, so the next model would stack on top of it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _wrapper_logits(inp: ParityInputs, prompts, device, dtype, as_trained: bool) -> list:
    """Logits of the wrapper: as trained (NF4 if it was), or in ``dtype`` over the same base
    weights the merge used (NF4-dequantized for ``--merge-base nf4``)."""
    from agiasi.merge import nf4_roundtrip
    from agiasi.model import AGIASI_SO8T_Wrapper

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


def parity_report(inp: ParityInputs, log) -> dict[str, Any]:
    """Every fidelity number of the export, one model in memory at a time."""
    from transformers import AutoModelForCausalLM

    from agiasi.evaluate import GGUFModel, hf_greedy, hf_logits, perplexity, text_ids
    from agiasi.gguf import rope_scaling_of
    from agiasi.merge import merged_tensors

    tok = inp.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PARITY_PROMPTS]
    device = measure_device()
    n_params = sum(p.numel() for p in _meta_model(inp.hf_config).parameters())
    dtype = measure_dtype(n_params, device)
    report: dict[str, Any] = {
        "parity": {},
        "measure": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "hf_weights": str(getattr(inp.hf_config, "dtype", "")).removeprefix("torch."),
            "skipped": [],
        },
    }
    skipped = report["measure"]["skipped"]

    stage = "merge bases"
    try:
        if inp.merge_plans:
            t_l = _wrapper_logits(inp, prompts, device, None, as_trained=True)
            report["merge_bases"] = {}
            for kind, plan in inp.merge_plans.items():
                m = AutoModelForCausalLM.from_config(inp.hf_config, dtype=torch.float32).eval()
                params = m.state_dict()
                with torch.no_grad():  # streamed in: one merged tensor at a time
                    for key, t in merged_tensors(plan):
                        params[key].copy_(t)
                report["merge_bases"][kind] = compare_all(t_l, [hf_logits(m, p) for p in prompts])
                del m, params
                release_memory()
            log("export: measured both merge bases" + memory_note())

        hf_l = None
        stage = "wrapper vs hf"
        if dtype is None:
            skipped.append(
                f"wrapper vs hf and hf perplexity: a {n_params / 1e9:.1f} B model does not fit "
                f"in the free memory of {device}"
            )
        else:
            w_l = _wrapper_logits(inp, prompts, device, dtype, as_trained=False)
            hf = load_model(inp.hf_dir, inp.hf_config, dtype, device)
            hf_l = [hf_logits(hf, p) for p in prompts]
            name = "wrapper_fp32 vs hf" if dtype == torch.float32 else "wrapper_bf16 vs hf"
            report["parity"][name] = compare_all(w_l, hf_l)
            log(f"export: measured the HF folder against the wrapper ({name})" + memory_note())

            stage = "hf perplexity"
            ids, cpt = text_ids(tok, inp.text)
            window = min(inp.num_ctx, 512)
            report["eval_text"] = {"tokens": len(ids), "chars_per_token": cpt, "window": window}
            report["parity"]["hf"] = {"ppl": perplexity(lambda c: hf_logits(hf, c), ids, window)}
            greedy_hf = hf_greedy(hf, prompts[0], 32)
            del hf
            release_memory()

        stage = "gguf"
        if not inp.ggufs:
            pass
        elif not inp.run_ggufs:
            skipped.append("gguf rows: running a GGUF needs llama-cpp-python")
        elif hf_l is None:
            skipped.append("gguf rows: they compare against the HF folder, which was skipped")
        else:
            for t, path in inp.ggufs.items():
                stage = f"gguf {t}"
                g = GGUFModel(path, n_ctx=parity_n_ctx(inp.num_ctx))
                try:
                    row = compare_all(hf_l, [g.logits(p) for p in prompts])
                    row["greedy_equal"] = g.greedy(prompts[0], 32) == greedy_hf
                    row["tokens_equal"] = all(
                        g.tokenize(s) == p for s, p in zip(PARITY_PROMPTS, prompts, strict=True)
                    )
                    row["ppl"] = perplexity(g.logits, ids, window)
                finally:
                    g.close()
                report["parity"][f"gguf {t} vs hf"] = row
                log(f"export: measured {path.name}" + memory_note())

            stage = "long context"
            cfg_dict = inp.hf_config.to_dict()
            # the smallest near-lossless GGUF: its KV cache for the long context comes on top
            ref_t = next((t for t in ("q8_0", "f16", "bf16", "f32") if t in inp.ggufs), None)
            if rope_scaling_of(cfg_dict) is not None and ref_t:
                long_ctx = long_context_n_ctx(cfg_dict, inp.num_ctx)
                g = GGUFModel(inp.ggufs[ref_t], n_ctx=long_ctx)
                try:
                    rows = [g.logits(p) for p in prompts]
                finally:
                    g.close()
                report["long_context"] = {
                    "n_ctx": long_ctx,
                    "gguf": ref_t,
                    **compare_all(hf_l, rows),
                }
    except MeasureError:
        raise
    except AgiasiError as e:
        raise MeasureError(stage, str(e)) from None
    except Exception as e:  # an unexpected failure of one stage must not lose the export
        raise MeasureError(stage, f"{type(e).__name__}: {e}") from e
    return report


def load_model(folder: Path, hf_config, dtype: torch.dtype, device: torch.device):
    """An HF folder's model on ``device``: streamed tensor by tensor to a GPU (host memory holds
    one tensor, not the mapped files), ``from_pretrained`` on the CPU (it skips the random
    initialisation a model built in place would pay there)."""
    from transformers import AutoModelForCausalLM

    from agiasi.weights import load_streamed

    if device.type == "cuda":
        model = load_streamed(folder, hf_config, dtype, device)
        if model is not None:
            return model
    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, device_map={"": device}
    ).eval()


def _meta_model(hf_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)
