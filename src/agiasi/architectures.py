"""The architectures agiasi knows, in one table: training, export, ``agiasi info`` and the README
read it. Adding an architecture = an entry here, a GGUF writer class in :mod:`agiasi.gguf.writer` if
it exports, and its tiny test model.

Why the LoRA targets differ: Phi-3 fuses q/k/v into ``qkv_proj`` (and gate/up into
``gate_up_proj``), so the design note's ``q_proj,k_proj,v_proj,o_proj`` would match only
``o_proj`` there (3.1 M trainable parameters instead of 9.4 M on Phi-3.5-mini).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agiasi.errors import AgiasiError

_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Architecture:
    """What agiasi needs to know about one HF ``model_type``."""

    model_type: str
    lora_targets: tuple[str, ...]
    gguf: str | None  # the llama.cpp architecture agiasi writes, None: training only
    vocabs: tuple[str, ...]  # "sentencepiece" (tokenizer.model) and/or "bpe" (tokenizer.json)
    example: str  # a Japanese model of this architecture
    notes: str = ""
    # llama.cpp's graph reads the output matrix from token_embd (no output tensor): a GGUF can
    # only hold a head equal to the input embedding, i.e. no folded soul
    gguf_tied_head_only: bool = False

    @property
    def exports_gguf(self) -> bool:
        return self.gguf is not None

    @property
    def gguf_support(self) -> str:
        """``yes (arch)``, with the tied-head limit where there is one, or ``no``."""
        if not self.exports_gguf:
            return "no"
        return f"yes ({self.gguf})" + (", --no-soul runs only" if self.gguf_tied_head_only else "")


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        Architecture(
            "phi3",
            ("qkv_proj", "o_proj"),
            "phi3",
            ("sentencepiece",),
            "AXCXEPT/Borea-Phi-3.5-mini-Instruct-Jp",
            "fused qkv/gate_up; LongRoPE factors; sliding window",
        ),
        Architecture(
            "llama",
            _QKVO,
            "llama",
            ("sentencepiece", "bpe"),
            "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.3",
            "q/k rows permuted for GGML's RoPE; tied heads untied on export; Llama-2 "
            "(sentencepiece) and Llama-3 (byte-level BPE, llama.cpp's llama-bpe) vocabularies",
        ),
        Architecture(
            "mistral",
            _QKVO,
            "llama",
            ("sentencepiece",),
            "stabilityai/japanese-stablelm-base-gamma-7b",
            "written as llama.cpp's llama architecture",
        ),
        Architecture(
            "qwen2",
            _QKVO,
            "qwen2",
            ("bpe",),
            "Qwen/Qwen2.5-7B-Instruct",
            "q/k/v biases; byte-level BPE (llama.cpp's qwen2 pre-tokenizer)",
        ),
        Architecture(
            "qwen3",
            _QKVO,
            "qwen3",
            ("bpe",),
            "Qwen/Qwen3-8B",
            "per-head q/k RMSNorm, head size of its own; Qwen2's byte-level BPE",
        ),
        Architecture(
            "gemma",
            _QKVO,
            "gemma",
            ("sentencepiece",),
            "google/gemma-7b",
            "llama.cpp's gemma takes its output matrix from the embedding, so a folded soul "
            "exports to HF only (GGUF for --no-soul runs)",
            gguf_tied_head_only=True,
        ),
        Architecture(
            "gemma2",
            _QKVO,
            "gemma2",
            ("sentencepiece",),
            "google/gemma-2-2b-jpn-it",
            "final-logit soft-capping in training; llama.cpp's gemma2 takes its output matrix "
            "from the embedding, so a folded soul exports to HF only (GGUF for --no-soul runs)",
            gguf_tied_head_only=True,
        ),
    ]
}


def architecture(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type)


def gguf_architecture(model_type: str) -> Architecture:
    """The table entry of an architecture that exports to GGUF, or one clear error."""
    arch = ARCHITECTURES.get(model_type)
    if arch is None or not arch.exports_gguf:
        ok = ", ".join(a.model_type for a in ARCHITECTURES.values() if a.exports_gguf)
        why = f" ({arch.notes})" if arch is not None else ""
        raise AgiasiError(
            f"GGUF export does not support architecture {model_type!r} yet{why}; supported: {ok}"
        )
    return arch


def vocabulary_kind(arch: Architecture, model_dir: Path) -> str:
    """Which vocabulary the GGUF gets: the sentencepiece model where the folder has one and the
    architecture reads it (Llama-2, Gemma, Phi-3), else the byte-level BPE of tokenizer.json
    (Llama-3, Qwen2). Only files are read; nothing from the folder is executed."""
    if "sentencepiece" in arch.vocabs and (model_dir / "tokenizer.model").is_file():
        return "sentencepiece"
    if "bpe" in arch.vocabs and (model_dir / "tokenizer.json").is_file():
        return "bpe"
    wanted = " or ".join(
        {"sentencepiece": "tokenizer.model", "bpe": "tokenizer.json (byte-level BPE)"}[v]
        for v in arch.vocabs
    )
    raise AgiasiError(
        f"{model_dir} has no {wanted}, which the GGUF vocabulary of a {arch.model_type} model "
        "needs; copy the base model's tokenizer files into it"
    )


def table_markdown() -> str:
    """The README's table, from this module (tests check the README matches)."""
    rows = [
        "| model_type | LoRA targets | GGUF | vocabulary | a Japanese model |",
        "|---|---|---|---|---|",
    ]
    for a in ARCHITECTURES.values():
        gguf = a.gguf_support
        vocab = " / ".join(
            {"sentencepiece": "sentencepiece", "bpe": "byte-level BPE"}[v] for v in a.vocabs
        )
        rows.append(
            f"| `{a.model_type}` | {', '.join(a.lora_targets)} | {gguf} | {vocab} | `{a.example}` |"
        )
    return "\n".join(rows)
