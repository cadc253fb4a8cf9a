"""The architectures agiasi knows, in one table: training, export, ``agiasi info`` and the README
read it. Adding an architecture = an entry here, a GGUF writer class in :mod:`agiasi.gguf` if
it exports, and its tiny test model.

Why the LoRA targets differ: Phi-3 fuses q/k/v into ``qkv_proj`` (and gate/up into
``gate_up_proj``), so the design note's ``q_proj,k_proj,v_proj,o_proj`` would match only
``o_proj`` there (3.1 M trainable parameters instead of 9.4 M on Phi-3.5-mini).
"""

from __future__ import annotations

from dataclasses import dataclass

from agiasi.errors import AgiasiError

_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Architecture:
    """What agiasi needs to know about one HF ``model_type``."""

    model_type: str
    lora_targets: tuple[str, ...]
    gguf: str | None  # the llama.cpp architecture agiasi writes, None: training only
    vocab: str  # "sentencepiece" (tokenizer.model) or "bpe" (tokenizer.json only)
    example: str  # a Japanese model of this architecture
    notes: str = ""

    @property
    def exports_gguf(self) -> bool:
        """GGUF export works end to end (a BPE vocabulary writer does not exist yet)."""
        return self.gguf is not None and self.vocab == "sentencepiece"


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        Architecture(
            "phi3",
            ("qkv_proj", "o_proj"),
            "phi3",
            "sentencepiece",
            "AXCXEPT/Borea-Phi-3.5-mini-Instruct-Jp",
            "fused qkv/gate_up; LongRoPE factors; sliding window",
        ),
        Architecture(
            "llama",
            _QKVO,
            "llama",
            "sentencepiece",
            "elyza/ELYZA-japanese-Llama-2-7b-instruct",
            "q/k rows permuted for GGML's RoPE; tied heads untied on export; Llama-3 BPE "
            "vocabularies (Llama-3.1-Swallow) train but do not export to GGUF yet",
        ),
        Architecture(
            "mistral",
            _QKVO,
            "llama",
            "sentencepiece",
            "stabilityai/japanese-stablelm-base-gamma-7b",
            "written as llama.cpp's llama architecture",
        ),
        Architecture(
            "qwen2",
            _QKVO,
            "qwen2",
            "bpe",
            "Qwen/Qwen2.5-7B-Instruct",
            "byte-level BPE vocabulary: trains; GGUF export not yet",
        ),
        Architecture("qwen3", _QKVO, None, "bpe", "Qwen/Qwen3-8B", "trains; no GGUF export yet"),
        Architecture("gemma", _QKVO, None, "sentencepiece", "google/gemma-7b", "trains only"),
        Architecture(
            "gemma2",
            _QKVO,
            None,
            "sentencepiece",
            "google/gemma-2-2b-jpn-it",
            "trains (final-logit soft-capping included); GGUF export not yet",
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


def table_markdown() -> str:
    """The README's table, from this module (tests check the README matches)."""
    rows = [
        "| model_type | LoRA targets | GGUF | vocabulary | a Japanese model |",
        "|---|---|---|---|---|",
    ]
    for a in ARCHITECTURES.values():
        gguf = f"yes ({a.gguf})" if a.exports_gguf else "no"
        rows.append(
            f"| `{a.model_type}` | {', '.join(a.lora_targets)} | {gguf} | {a.vocab} | "
            f"`{a.example}` |"
        )
    return "\n".join(rows)
