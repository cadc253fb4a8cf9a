"""Perplexity of a training checkpoint, an HF folder or a GGUF file (llama.cpp), on as much of a
text file as the measure needs.

Perplexity is token-level: the text is tokenized once by the model's own tokenizer (no BOS),
cut into non-overlapping windows of ``window`` tokens, and every token after the first of each
window is scored. Chars per token is reported so runs with other tokenizers compare.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agiasi.errors import AgiasiError
from agiasi.eval.models import model_kind, open_eval_model
from agiasi.model.loading import DType
from agiasi.options import option

MAX_EVAL_TOKENS = 4096


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------- logits sources


def perplexity(logits_fn, ids: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        lp = log_softmax_np(logits_fn(chunk)[:-1])
        tgt = np.array(chunk[1:])
        nll -= float(lp[np.arange(len(tgt)), tgt].sum())
        count += len(tgt)
    if count == 0:
        raise AgiasiError("the evaluation text is shorter than two tokens")
    return math.exp(nll / count)


def eval_text(text_path: str | Path | None) -> Path:
    """The evaluation text's path (default: the shipped held-out sample), checked before any
    model loads: it exists and its first block is text in an accepted encoding."""
    from agiasi.shipped import default_heldout
    from agiasi.textfiles import read_text

    path = Path(text_path) if text_path else default_heldout()
    if not path.is_file():
        raise AgiasiError(f"evaluation text not found: {path}")
    read_text(path, "evaluation text", max_chars=4096)
    return path


# Characters read first for every token asked (then doubled until enough): Japanese runs at 1-3
# characters a token, code and English at 3-5. Tokens this close to the end of what was read
# may merge with text past it, so they are not used unless the file ended there.
CHARS_PER_TOKEN_READ = 8
EDGE_TOKENS = 64


def prefix_ids(
    tokenize: Callable[[str], list[int]], text_path: str | Path | None, limit: int
) -> tuple[list[int], float, int]:
    """The first ``limit`` token ids of the evaluation text, its characters per token and the
    characters read. Only as much of the file is read and tokenized as those tokens need (the
    prefix is cut at a line end and tokenized in one call, so the ids are those of the whole
    file): ``--max-tokens 2048`` of a 200 MB file reads kilobytes, not the file."""
    from agiasi.textfiles import read_text

    path = eval_text(text_path)
    want = max(1 << 16, limit * CHARS_PER_TOKEN_READ)
    while True:
        text = read_text(path, "evaluation text", max_chars=want + 1)
        whole = len(text) <= want
        if not whole:
            cut = text.rfind("\n", 0, want)
            text = text[: cut + 1] if cut > want // 2 else text[:want]
        ids = tokenize(text)
        if whole or len(ids) >= limit + EDGE_TOKENS:
            return ids[:limit], len(text) / max(1, len(ids)), len(text)
        want *= 2


def text_ids(
    tok, text_path: str | Path | None, limit: int = MAX_EVAL_TOKENS
) -> tuple[list[int], float]:
    """Token ids of the evaluation text (at most ``limit``) and its characters per token."""
    ids, chars_per_token, _ = prefix_ids(
        lambda t: tok(t, add_special_tokens=False, verbose=False)["input_ids"], text_path, limit
    )
    return ids, chars_per_token


# --------------------------------------------------------------------------- `agiasi eval`


@dataclass
class EvalConfig:
    """Flags of ``agiasi eval``."""

    model: str | None = option(None, "step_N folder, HF model folder or .gguf file")
    text: str | None = option(
        None, "UTF-8 text file (default: the shipped held-out Japanese sample)"
    )
    task: str | None = option(
        None,
        "JGLUE multiple choice instead of perplexity: jcommonsenseqa, jnli or both "
        "(comma-separated), scored as lm-evaluation-harness's japanese_leaderboard tasks",
    )
    num_fewshot: int = option(
        0, "--task: answered examples before each item (the leaderboard uses 3)", ge=0
    )
    fewshot_seed: int = option(1234, "--task: seed of the few-shot draw (lm-eval's default)")
    chat_template: bool = option(False, "--task: wrap each prompt in the model's chat template")
    limit: int | None = option(None, "--task: score only the first N items of each task", ge=1)
    task_data: str | None = option(
        None, "--task: PATH or TASK=PATH,… of items to score instead of the shipped valid sets"
    )
    fewshot_data: str | None = option(
        None, "--task: PATH or TASK=PATH,… of the few-shot pool (default: the shipped train split)"
    )
    compare: str | None = option(
        None,
        "BASE,MODEL[,…]: with --task scored on the same items, each against the first with a "
        "95 % paired-bootstrap interval and a verdict; without, each one's perplexity on the "
        "same text",
    )
    report: str | None = option(
        None,
        "write the whole JSON report here (--task: every item's prompt and scores; --compare: "
        "each model's perplexity)",
    )
    device: str | None = option(
        None, "cpu, cuda or cuda:N for a step or HF folder (default: the GPU if there is one)"
    )
    window: int | None = option(
        None, "tokens per window (default: 512, or the model's trained context if shorter)", ge=2
    )
    max_tokens: int = option(16384, "evaluate at most this many tokens of the text", ge=2)
    n_ctx: int = option(4096, "llama.cpp context for GGUF files", ge=16)
    base_model: str | None = option(
        None, "for a step folder: the base model, if not where the checkpoint says"
    )
    dtype: DType = option(
        "auto", "compute dtype for a step folder or HF folder (auto: float32 on CPU)"
    )
    trust_remote_code: bool = option(
        False, "allow a base model that runs its own code (never taken from the checkpoint)"
    )
    json: bool = option(False, "print JSON")


DEFAULT_WINDOW = 512


def eval_window(window: int | None, context: int | None) -> int:
    """The default window never runs past the trained context: positions a model never saw
    make perplexity measure extrapolation instead of the model (the tiny model, trained on 256
    tokens, scores 35 with 256-token windows and 56 with 512). An explicit window is kept, with
    a warning when it runs past the context."""
    if window is not None:
        if context and window > context:
            print(
                f"warning: --window {window} is past the model's context of {context} tokens: "
                "the perplexity measures positions it never saw",
                file=sys.stderr,
            )
        return window
    return min(DEFAULT_WINDOW, context) if context else DEFAULT_WINDOW


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Token-level perplexity of a checkpoint, an HF folder or a GGUF on a text file."""
    from agiasi.options import check

    check(cfg)
    model_kind(cfg.model)
    text_path = eval_text(cfg.text)
    m = open_eval_model(
        cfg.model,
        base_model=cfg.base_model,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        n_ctx=max(cfg.n_ctx, cfg.window or 0),
    )
    try:
        ids, chars_per_token, _ = prefix_ids(m.tokenize, text_path, cfg.max_tokens)
        window = eval_window(cfg.window, m.context)
        ppl = perplexity(m.logits, ids, window)
    finally:
        m.close()
    return {
        "model": str(cfg.model),
        "kind": m.kind,
        "text": str(text_path),
        "perplexity": ppl,
        "tokens": len(ids),
        "window": window,
        "stride": window,
        "trained_context": m.context,
        "chars_per_token": chars_per_token,
    }
