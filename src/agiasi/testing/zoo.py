"""Tiny random models, one per row of the architecture table, each with its family's real
features (GQA, tied embeddings, biases, soft-capping, RoPE scaling) and a tokenizer of the kind
the family ships, trained on the package's sample text: no hub, no network. The tests and
``bench/architectures.py`` both build from here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from agiasi.shipped import default_dataset

# Japanese lines with kanji, kana, half-width katakana, emoji and full-width digits: what every
# row's tokenizer and GGUF must treat alike.
JA_TEXTS = [
    "吾輩は猫である。名前はまだ無い。",
    "ﾊﾝｶｸｶﾀｶﾅとカタカナ、ひらがなを混ぜた文です。",
    "絵文字😺🍣🗾も数字12345と２０２６年11月26日も、東京タワーは333m。",
]

ZOO_MODEL_TYPE = {
    "phi3": "phi3",
    "llama-sp": "llama",
    "llama-bpe": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
}

ZOO = ("phi3", "llama-sp", "llama-bpe", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


def _tokenizer_for(kind: str, out: Path):
    from agiasi.testing.tokenizer import build_bpe_tokenizer, build_phi3_tokenizer

    if kind in ("llama-bpe", "qwen2", "qwen3"):
        style = "llama-bpe" if kind == "llama-bpe" else "qwen2"
        return build_bpe_tokenizer([default_dataset()], out, style=style, vocab_size=1000)
    return build_phi3_tokenizer(
        [default_dataset()],
        out,
        vocab_size=1000,
        normalization="identity",
        model_type="bpe",
        style="gemma" if kind.startswith("gemma") else "phi3",
    )


# Per kind: the transformers class prefix and what its tiny config sets beyond the common
# shape — each exercising what that family does differently.
TINY_SHAPES: dict[str, tuple[str, dict]] = {
    "phi3": ("Phi3", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    # Llama-2 style: sentencepiece, tied head, GQA
    "llama-sp": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Llama-3.1 style: byte-level BPE, GQA, llama3 RoPE scaling
    "llama-bpe": (
        "Llama",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,  # small, so every band is exercised
            },
        ),
    ),
    "mistral": ("Mistral", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # Qwen2.5-0.5B style: q/k/v biases, tied head, GQA
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Qwen3-0.6B style: q/k norms, head_dim != hidden / heads, tied, GQA
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    # Gemma-1: embeddings scaled by sqrt(hidden), norms as 1 + w, tied
    "gemma": ("Gemma", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    # soft-capping on attention and logits, sliding window, tied head
    "gemma2": (
        "Gemma2",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=5.0,  # small, so the cap bites on these logits
            sliding_window=256,
            tie_word_embeddings=True,
        ),
    ),
}


def build_tiny_arch(kind: str, out: Path, seed: int = 0) -> Path:
    """A tiny random model of ``kind`` (one of :data:`ZOO`) with its tokenizer, as an HF folder."""
    import transformers

    out = Path(out)
    tok = _tokenizer_for(kind, out)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if kind not in TINY_SHAPES:
        raise ValueError(kind)
    cls, extra = TINY_SHAPES[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{cls}Config")(**common, **extra)
    cfg.architectures = [f"{cls}ForCausalLM"]
    getattr(transformers, f"{cls}ForCausalLM")(cfg).eval().save_pretrained(out)
    return out
