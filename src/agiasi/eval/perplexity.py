"""Perplexity and parity for a training checkpoint, an HF folder or a GGUF file (llama.cpp).

Perplexity is token-level: the text is tokenized once by the model's own tokenizer (no BOS),
cut into non-overlapping windows of ``window`` tokens, and every token after the first of each
window is scored. Chars per token is reported so runs with other tokenizers compare.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agiasi.errors import AgiasiError, first_line
from agiasi.model.loading import DType
from agiasi.options import option

MAX_EVAL_TOKENS = 4096


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------- logits sources


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        x = torch.tensor([ids], device=_device_of(model))
        return model(x).logits[0].float().cpu().numpy()


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
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise AgiasiError(f"{path} is not a GGUF file (no GGUF magic at its start)")
        from agiasi.gguf.quantize import quiet_llama_cpp

        quiet_llama_cpp()
        try:
            self.llm = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                logits_all=True,
                verbose=False,
                n_threads=os.cpu_count() or 1,
                n_batch=512,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise AgiasiError(
                f"llama.cpp could not load {path} ({first_line(e)}): a truncated or damaged "
                "GGUF, or an architecture this llama.cpp does not know"
            ) from None
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

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids; ``add_special``: with BOS/EOS where the GGUF says llama.cpp adds them (what
        a prompt gets in llama.cpp and Ollama)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def encode(self, text: str) -> list[int]:
        """lm-eval's rule: the specials llama.cpp adds (BOS where the GGUF says so) unless the
        text already starts with the BOS piece (a chat template that writes it)."""
        bos = self.llm.token_bos()
        piece = (
            self.llm.detokenize([bos], special=True).decode("utf-8", "replace") if bos >= 0 else ""
        )
        special = not (piece and text.startswith(piece))
        return self.tokenize(text, add_special=special)

    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The GGUF's own chat template (its metadata), rendered by transformers' sandboxed
        jinja renderer as an HF tokenizer would render it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        def piece(token: int) -> str:
            return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

        specials = {
            "bos_token": piece(self.llm.token_bos()) if self.llm.token_bos() >= 0 else "",
            "eos_token": piece(self.llm.token_eos()) if self.llm.token_eos() >= 0 else "",
        }
        template = self.chat_template()

        def render(m):
            out, _ = render_jinja_template(
                [m], chat_template=template, add_generation_prompt=True, **specials
            )
            return out[0]

        return render_template(render, messages)

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
            torch.tensor([ids], device=_device_of(model)),
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
        "--task: BASE,MODEL[,…] scored on the same items; each against the first with a 95 % "
        "paired-bootstrap interval and a verdict",
    )
    report: str | None = option(
        None, "--task: write the whole JSON report (every item's prompt and scores) here"
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


def model_kind(path: str | Path) -> str:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    from agiasi.checkpoint.step_folder import is_step_folder

    if is_step_folder(p):
        return "checkpoint"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    if not p.exists():
        raise AgiasiError(f"model not found: {str(path)!r}")
    raise AgiasiError(
        f"{str(path)!r} is neither a .gguf file, an agiasi step folder (soul.json) nor an HF "
        "model folder (config.json)"
    )


def load_hf_model(folder: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """An HF folder's causal LM (see :func:`agiasi.model.loading.open_model`)."""
    from agiasi.model.loading import open_model

    return open_model(folder, dtype, device, what="the model")


@dataclass
class EvalModel:
    """A model opened for measuring, whatever it is: its logits, its tokenizer under both
    rules (bare for perplexity; lm-eval's for benchmarks), its chat template and a scorer."""

    kind: str
    path: str
    logits: Callable[[list[int]], np.ndarray]
    tokenize: Callable[[str], list[int]]
    encode: Callable[[str], list[int]]
    chat: Callable[[list[dict[str, str]]], str] | None
    context: int | None
    scorer: Any
    close: Callable[[], None]


def open_eval_model(
    path: str | Path,
    base_model: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    n_ctx: int = 4096,
    device: str | None = "cpu",
) -> EvalModel:
    """A step folder (the soul wrapper), an HF folder or a GGUF (llama.cpp), opened once."""
    kind = model_kind(path)
    if kind == "gguf":
        return _open_gguf(path, n_ctx)
    from agiasi.model.loading import parse_device, resolve_dtype

    dev = parse_device(device)
    if kind == "checkpoint":
        from agiasi.model.wrapper import AGIASI_SO8T_Wrapper

        overrides = {"base_model": base_model} if base_model else {}
        model = AGIASI_SO8T_Wrapper.from_checkpoint(
            path,
            device=dev,
            lora_dropout=0.0,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            **overrides,
        ).eval()
        return _torch_eval_model(kind, path, model, model.config.base_model, model.hf_config, dev)
    model = load_hf_model(path, resolve_dtype(dtype, dev), dev)
    return _torch_eval_model(kind, path, model, path, model.config, dev)


def _open_gguf(path: str | Path, n_ctx: int) -> EvalModel:
    from agiasi.eval.loglik import GGUFScorer

    g = GGUFModel(path, n_ctx=n_ctx)
    ctx = g.context_length()
    return EvalModel(
        "gguf",
        str(path),
        g.logits,
        g.tokenize,
        g.encode,
        g.chat if g.chat_template() else None,
        min(ctx, n_ctx) if ctx else n_ctx,
        GGUFScorer(g.llm),
        g.close,
    )


def _torch_eval_model(kind: str, path, model, tok_src, hf_config, dev) -> EvalModel:
    """An HF model or the wrapper with its HF tokenizer, under both tokenizer rules."""
    from transformers import AutoTokenizer

    from agiasi.eval.loglik import TorchScorer
    from agiasi.gguf.arch import trained_context

    tok = AutoTokenizer.from_pretrained(tok_src)
    embed = (model.causal_lm if kind == "checkpoint" else model).get_input_embeddings()

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()

    def tokenize(text: str) -> list[int]:
        return tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode(text: str) -> list[int]:
        bos = tok.bos_token
        special = not (bos and text.startswith(bos))
        return tok(text, add_special_tokens=special, verbose=False)["input_ids"]

    def chat(messages: list[dict[str, str]]) -> str:
        return render_template(
            lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
            messages,
        )

    return EvalModel(
        kind,
        str(path),
        logits,
        tokenize,
        encode,
        chat if tok.chat_template else None,
        trained_context(hf_config.to_dict()),
        TorchScorer(model, dev, embed.weight.dtype, embed.weight.shape[0]),
        lambda: None,
    )


def render_template(render: Callable[[list[dict[str, str]]], str], messages) -> str:
    """A chat template on ``messages`` within the render budget; a template that refuses the
    system turn renders without it, as lm-eval does (the description is then dropped)."""
    from agiasi.templates import bounded

    try:
        return bounded(lambda: render(messages), "the chat template")
    except AgiasiError:
        raise
    except Exception:  # jinja2's TemplateError and whatever the template raises
        rest = [m for m in messages if m["role"] != "system"]
        try:
            return bounded(lambda: render(rest), "the chat template")
        except AgiasiError:
            raise
        except Exception as e:
            raise AgiasiError(f"the chat template refused the prompt: {first_line(e)}") from None


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
