"""Perplexity and parity for a training checkpoint, an HF folder or a GGUF file (llama.cpp).

Perplexity is token-level: the text is tokenized once by the model's own tokenizer (no BOS),
cut into non-overlapping windows of ``window`` tokens, and every token after the first of each
window is scored. Chars per token is reported so runs with other tokenizers compare.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agiasi.errors import AgiasiError

MAX_EVAL_TOKENS = 4096


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


# --------------------------------------------------------------------------- logits sources


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


class GGUFModel:
    """A GGUF in llama.cpp (llama-cpp-python), with all-position logits."""

    def __init__(self, path: str | Path, n_ctx: int = 4096):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise AgiasiError(
                "running a GGUF needs llama-cpp-python: pip install llama-cpp-python"
            ) from None
        if not Path(path).is_file():
            raise AgiasiError(f"GGUF file not found: {path}")
        from agiasi.gguf import quiet_llama_cpp

        quiet_llama_cpp()
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            n_threads=os.cpu_count() or 1,
            n_batch=512,
        )
        self.n_ctx = n_ctx

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def context_length(self) -> int | None:
        """The GGUF's ``{arch}.context_length`` (the HF config's max_position_embeddings)."""
        md = self.llm.metadata
        n = md.get(f"{md.get('general.architecture', '')}.context_length")
        return int(n) if n else None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            self.llm.eval([nxt])
        return out

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            min_new_tokens=n,
        )
    return out[0, len(ids) :].tolist()


def perplexity(logits_fn, ids: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        lp = _log_softmax_np(logits_fn(chunk)[:-1])
        tgt = np.array(chunk[1:])
        nll -= float(lp[np.arange(len(tgt)), tgt].sum())
        count += len(tgt)
    if count == 0:
        raise AgiasiError("the evaluation text is shorter than two tokens")
    return math.exp(nll / count)


def _eval_text(text_path: str | Path | None) -> tuple[Path, str]:
    """The evaluation text (default: the shipped held-out sample), checked before any model loads."""
    from agiasi.data import default_heldout

    path = Path(text_path) if text_path else default_heldout()
    if not path.is_file():
        raise AgiasiError(f"evaluation text not found: {path}")
    return path, path.read_text(encoding="utf-8")


def _text_ids(
    tok, text_path: str | Path | None, limit: int = MAX_EVAL_TOKENS
) -> tuple[list[int], float]:
    _, text = _eval_text(text_path)
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    chars_per_token = len(text) / max(1, len(ids))
    return ids[:limit], chars_per_token


# --------------------------------------------------------------------------- export parity


def parity_report(
    ckpt,
    mcfg,
    merged: dict[str, dict],
    hf_config,
    hf_dir: Path,
    ggufs: dict[str, Path],
    tok,
    num_ctx: int,
    text: str | None,
    log,
    merge_base: str = "w16",
) -> dict[str, Any]:
    """Fidelity of every export stage; ``wrapper_fp32 vs hf`` uses the same base weights as the
    merge (original, or NF4-dequantized), so it isolates the exactness of merge + fold."""
    import gc

    from transformers import AutoModelForCausalLM

    from agiasi.model import AGIASI_SO8T_Wrapper

    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in _prompts()]
    report: dict[str, Any] = {"parity": {}}
    # One big model in memory at a time (a 3.8B model is 15 GB in fp32): logits are kept,
    # models are dropped before the next one is built.

    # wrapper (fp32, LoRA unmerged, soul applied) — the reference for the folded HF model
    wrapper = AGIASI_SO8T_Wrapper.from_checkpoint(
        ckpt, device="cpu", quantization="none", dtype="float32", lora_dropout=0.0
    ).eval()
    if merge_base == "nf4":
        # compare like with like: the fp32 wrapper over the same NF4-dequantized base weights
        from agiasi.export import nf4_roundtrip

        decoder = getattr(wrapper.causal_lm, wrapper.causal_lm.base_model_prefix)
        with torch.no_grad():
            for name, module in decoder.named_modules():
                if isinstance(module, torch.nn.Linear) and "lora_" not in name:
                    module.weight.copy_(nf4_roundtrip(module.weight))
    with torch.no_grad():
        w_l = [wrapper(torch.tensor([p])).logits[0].float().numpy() for p in prompts]
    del wrapper
    gc.collect()

    # both merge bases against the wrapper as trained (NF4), when both were merged
    if len(merged) > 1:
        trained = AGIASI_SO8T_Wrapper.from_checkpoint(ckpt, device="cpu", lora_dropout=0.0).eval()
        with torch.no_grad():
            t_l = [trained(torch.tensor([p])).logits[0].float().numpy() for p in prompts]
        del trained
        report["merge_bases"] = {}
        for kind, sd in merged.items():
            m = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
            m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
            m.eval()
            report["merge_bases"][kind] = _agg(
                [compare_logits(a, hf_logits(m, p)) for a, p in zip(t_l, prompts, strict=True)]
            )
            del m
            gc.collect()

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    hf_l = [hf_logits(hf, p) for p in prompts]
    report["parity"]["wrapper_fp32 vs hf"] = _agg(
        [compare_logits(a, b) for a, b in zip(w_l, hf_l, strict=True)]
    )

    ids, cpt = _text_ids(tok, text)
    window = min(num_ctx, 512)
    report["eval_text"] = {"tokens": len(ids), "chars_per_token": cpt, "window": window}
    report["parity"]["hf"] = {"ppl": perplexity(lambda c: hf_logits(hf, c), ids, window)}
    greedy_hf = hf_greedy(hf, prompts[0], 32)
    for t, path in ggufs.items():
        g = GGUFModel(path, n_ctx=num_ctx)
        row = _agg([compare_logits(a, g.logits(p)) for a, p in zip(hf_l, prompts, strict=False)])
        row["greedy_equal"] = g.greedy(prompts[0], 32) == greedy_hf
        row["tokens_equal"] = all(
            g.tokenize(s) == p for s, p in zip(_prompts(), prompts, strict=False)
        )
        row["ppl"] = perplexity(g.logits, ids, window)
        report["parity"][f"gguf {t} vs hf"] = row
        g.close()
        log(f"export: measured {path.name}")
    # LongRoPE: llama.cpp switches factors by context size; measure a long context too
    from agiasi.gguf import rope_scaling_of

    cfg_dict = hf_config.to_dict()
    ref_t = "f32" if "f32" in ggufs else ("f16" if "f16" in ggufs else None)
    if rope_scaling_of(cfg_dict) is not None and ref_t:
        long_ctx = int(cfg_dict.get("max_position_embeddings", num_ctx))
        g = GGUFModel(ggufs[ref_t], n_ctx=long_ctx)
        report["long_context"] = {
            "n_ctx": long_ctx,
            "gguf": ref_t,
            **_agg([compare_logits(a, g.logits(p)) for a, p in zip(hf_l, prompts, strict=False)]),
        }
        g.close()
    return report


def _prompts() -> list[str]:
    from agiasi.export import PARITY_PROMPTS

    return PARITY_PROMPTS


def _agg(rows: list[dict[str, float]]) -> dict[str, float]:
    return {
        "max_abs_dlogit": max(r["max_abs_dlogit"] for r in rows),
        "rel_dlogit": max(r["rel_dlogit"] for r in rows),
        "top1": float(np.mean([r["top1"] for r in rows])),
        "mean_kl": float(np.mean([r["mean_kl"] for r in rows])),
    }


# --------------------------------------------------------------------------- `agiasi eval`


@dataclass
class EvalConfig:
    """Flags of ``agiasi eval``."""

    model: str = ""
    text: str | None = None
    window: int | None = None  # None: 512, or the model's trained context if that is shorter
    max_tokens: int = 16384
    n_ctx: int = 4096
    base_model: str | None = None
    json: bool = False


DEFAULT_WINDOW = 512


def eval_window(window: int | None, context: int | None) -> int:
    """The default window never runs past the trained context: positions a model never saw
    make perplexity measure extrapolation instead of the model (the tiny model, trained on 256
    tokens, scores 35 with 256-token windows and 56 with 512). An explicit window is kept."""
    if window is not None:
        return window
    return min(DEFAULT_WINDOW, context) if context else DEFAULT_WINDOW


def model_kind(path: str | Path) -> str:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / "soul.json").is_file():
        return "checkpoint"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    if not p.exists():
        raise AgiasiError(f"model not found: {str(path)!r}")
    raise AgiasiError(
        f"{str(path)!r} is neither a .gguf file, an agiasi step folder (soul.json) nor an HF "
        "model folder (config.json)"
    )


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Token-level perplexity of a checkpoint, an HF folder or a GGUF on a text file."""
    from agiasi.gguf import trained_context

    if cfg.window is not None and cfg.window < 2:
        raise AgiasiError(f"--window must be at least 2, got {cfg.window}")
    kind = model_kind(cfg.model)
    text_path, text = _eval_text(cfg.text)
    if kind == "gguf":
        g = GGUFModel(cfg.model, n_ctx=max(cfg.n_ctx, cfg.window or 0))
        logits_fn, tokenize, context, close = g.logits, g.tokenize, g.context_length(), g.close
    else:
        from transformers import AutoTokenizer

        if kind == "checkpoint":
            from agiasi.model import AGIASI_SO8T_Wrapper

            overrides = {"base_model": cfg.base_model} if cfg.base_model else {}
            model = AGIASI_SO8T_Wrapper.from_checkpoint(
                cfg.model, lora_dropout=0.0, **overrides
            ).eval()
            tok_src, hf_config = model.config.base_model, model.hf_config

            def logits_fn(chunk):
                with torch.no_grad():
                    return model(torch.tensor([chunk])).logits[0].float().cpu().numpy()
        else:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
            tok_src, hf_config = cfg.model, hf.config

            def logits_fn(chunk):
                return hf_logits(hf, chunk)

        tok = AutoTokenizer.from_pretrained(tok_src)
        context = trained_context(hf_config.to_dict())

        def tokenize(t):
            return tok(t, add_special_tokens=False, verbose=False)["input_ids"]

        def close():
            return None

    try:
        all_ids = tokenize(text)
        window = eval_window(cfg.window, context)
        ids = all_ids[: cfg.max_tokens]
        ppl = perplexity(logits_fn, ids, window)
    finally:
        close()
    return {
        "model": str(cfg.model),
        "kind": kind,
        "text": str(text_path),
        "perplexity": ppl,
        "tokens": len(ids),
        "window": window,
        "stride": window,
        "trained_context": context,
        "chars_per_token": len(text) / max(1, len(all_ids)),
    }
