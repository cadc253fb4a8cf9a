"""Opening anything agiasi measures — a step folder (the wrapper, soul applied), an HF folder,
a GGUF through llama.cpp — as one :class:`EvalModel` with logits, tokenization and the chat
template; perplexity, JGLUE and the export's fidelity measure all score through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agiasi.errors import AgiasiError, first_line


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        x = torch.tensor([ids], device=_device_of(model))
        return model(x).logits[0].float().cpu().numpy()


class GGUFModel:
    """A GGUF in llama.cpp (llama-cpp-python), with all-position logits."""

    def __init__(self, path: str | Path, n_ctx: int = 4096, logits_all: bool = True):
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
                logits_all=logits_all,  # every position's logits (scoring), or the last only
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
