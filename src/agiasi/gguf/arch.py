"""The architecture half of the GGUF writer: what each llama.cpp architecture needs beyond the
common keys — metadata, extra tensors (RoPE factors), per-tensor transforms (the Llama q/k row
permutation from HF's rotate-half layout to GGML's interleaved one, Gemma's 1 + w norms) — one
small class each, as in llama.cpp's own converter. The file format and writing are
:mod:`agiasi.gguf.writer`; which model types map to which class is :mod:`agiasi.architectures`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from agiasi.errors import AgiasiError
from agiasi.gguf.vocab import bpe_vocabulary, sentencepiece_vocabulary
from agiasi.weights import EMBED_KEY, HEAD_KEY


def rope_scaling_of(config: dict) -> dict | None:
    """LongRoPE parameters (type ``longrope``, or the older ``su``), else None."""
    kind, rp = rope_type_of(config)
    return rp if kind in ("longrope", "su") and rp.get("long_factor") is not None else None


def trained_context(config: dict) -> int | None:
    """The positions a model was trained on: LongRoPE's original window, else its maximum."""
    n = config.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    return int(n) if n else None


def rope_theta_of(config: dict) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    rp = config.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return 10000.0


def rope_type_of(config: dict) -> tuple[str, dict]:
    """The RoPE variant and its parameters from either spelling (``rope_scaling`` of
    transformers 4, ``rope_parameters`` of transformers 5); ``"default"`` when plain."""
    for key in ("rope_scaling", "rope_parameters"):
        rp = config.get(key)
        if isinstance(rp, dict):
            kind = str(rp.get("rope_type", rp.get("type")) or "default").lower()
            if kind != "default":
                return kind, rp
    return "default", {}


def llama3_rope_factors(config: dict) -> torch.Tensor:
    """Llama-3.1's per-frequency RoPE divisors (``rope_type: llama3``), which llama.cpp reads
    from a ``rope_freqs`` tensor. The formula is transformers' ``_compute_llama3_parameters``
    (no library exposes it as factors): wavelengths shorter than original/high_freq_factor keep
    their frequency, longer than original/low_freq_factor are divided by ``factor``, and the
    band between is interpolated."""
    _, rp = rope_type_of(config)
    dim = _head_dim(config)
    base = rope_theta_of(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = float(rp.get("factor", 8.0))
    low, high = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(out), out)
    out = torch.where(wavelen > old_ctx / low, torch.full_like(out, factor), out)
    return out.to(torch.float32)


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores Llama q/k rows for rotate-half RoPE; GGML's LLAMA rope pairs adjacent rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# --------------------------------------------------------------------------- architectures


class GGUFArch:
    """One llama.cpp architecture (like the converter classes of ``convert_hf_to_gguf.py``):
    the metadata beyond the common keys, extra tensors, and per-tensor transforms."""

    gguf_name = "llama"
    rope_types: tuple[str, ...] | None = None  # the RoPE variants it writes; None: not checked

    def check(self, cfg: dict, sd) -> None:
        """Refuse a folder this architecture cannot represent (before anything is written)."""
        kind, _ = rope_type_of(cfg)
        if self.rope_types is not None and kind not in self.rope_types:
            raise AgiasiError(
                f"RoPE type {kind!r} is not one agiasi writes for llama.cpp's {self.gguf_name} "
                f"({', '.join(self.rope_types)}); export the HF folder only (--gguf '')"
            )

    def parameters(self, w, cfg: dict) -> None:
        """Keys beyond :func:`_common_parameters`."""

    def vocabulary(self, w, hf_dir: Path, vocab: int, kind: str) -> None:
        if kind == "sentencepiece":
            sentencepiece_vocabulary(w, hf_dir, vocab)
        else:
            bpe_vocabulary(w, hf_dir, vocab)

    def extra_tensors(self, cfg: dict) -> dict[str, torch.Tensor]:
        """Tensors the HF state dict does not hold (GGUF names)."""
        return {}

    def skip(self, hf_name: str) -> bool:
        """HF tensors the llama.cpp architecture has no place for."""
        return False

    def transform(self, hf_name: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
        return t


class LlamaGGUF(GGUFArch):
    """Llama and Mistral: HF stores q/k rows for rotate-half RoPE, GGML pairs adjacent rows;
    Llama-3.1's RoPE scaling as a ``rope_freqs`` tensor, linear scaling as metadata."""

    gguf_name = "llama"
    rope_types = ("default", "llama3", "linear")

    def extra_tensors(self, cfg: dict) -> dict[str, torch.Tensor]:
        import gguf

        if rope_type_of(cfg)[0] != "llama3":
            return {}
        return {
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(cfg)
        }

    def parameters(self, w, cfg: dict) -> None:
        n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = _head_dim(cfg)
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(int(cfg["vocab_size"]))
        if cfg.get("head_dim") and head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        _linear_rope(w, cfg)

    def transform(self, hf_name: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
        n_head = int(cfg["num_attention_heads"])
        if hf_name.endswith("q_proj.weight"):
            return _permute_qk(t, n_head)
        if hf_name.endswith("k_proj.weight"):
            return _permute_qk(t, int(cfg.get("num_key_value_heads") or n_head))
        return t


def _linear_rope(w, cfg: dict) -> None:
    import gguf

    kind, rp = rope_type_of(cfg)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))


class Phi3GGUF(GGUFArch):
    """Phi-3: partial rotary, the original window, sliding window, LongRoPE factor tensors."""

    gguf_name = "phi3"

    def parameters(self, w, cfg: dict) -> None:
        rope_dims = self._rope_dims(cfg)
        w.add_rope_dimension_count(rope_dims)
        orig = trained_context(cfg) or 4096
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))
        rs = rope_scaling_of(cfg)
        if rs is None:
            return
        rs_orig = int(rs.get("original_max_position_embeddings") or orig)
        scale = int(cfg.get("max_position_embeddings", rs_orig)) / rs_orig
        attn = math.sqrt(1 + math.log(scale) / math.log(rs_orig)) if scale > 1.0 else 1.0
        if rs.get("attention_factor") is not None:
            attn = float(rs["attention_factor"])
        w.add_rope_scaling_attn_factors(attn)
        if len(rs["long_factor"]) != rope_dims // 2:
            raise AgiasiError(
                f"LongRoPE factors have {len(rs['long_factor'])} entries, expected {rope_dims // 2}"
            )

    def extra_tensors(self, cfg: dict) -> dict[str, torch.Tensor]:
        import gguf

        rs = rope_scaling_of(cfg)
        if rs is None:
            return {}
        names = gguf.TENSOR_NAMES
        return {
            names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": torch.tensor(
                rs["long_factor"], dtype=torch.float32
            ),
            names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": torch.tensor(
                rs["short_factor"], dtype=torch.float32
            ),
        }

    @staticmethod
    def _rope_dims(cfg: dict) -> int:
        rot_pct = float(cfg.get("partial_rotary_factor", 1.0))
        return int(rot_pct * int(cfg["hidden_size"])) // int(cfg["num_attention_heads"])


class Qwen2GGUF(GGUFArch):
    """Qwen2/2.5: q/k/v biases (mapped by gguf's name table), NEOX RoPE in llama.cpp, so no row
    permutation; the head is optional in llama.cpp, so an untied (folded) head is kept."""

    gguf_name = "qwen2"
    rope_types = ("default", "linear")

    def parameters(self, w, cfg: dict) -> None:
        w.add_vocab_size(int(cfg["vocab_size"]))
        if cfg.get("head_dim"):  # Qwen3's heads are wider than hidden / heads
            w.add_key_length(int(cfg["head_dim"]))
            w.add_value_length(int(cfg["head_dim"]))
        _linear_rope(w, cfg)


class Qwen3GGUF(Qwen2GGUF):
    """Qwen3: Qwen2 without the q/k/v biases, with RMSNorm on each head's q and k (``q_norm``,
    ``k_norm``: mapped by gguf's name table) and a head size of its own."""

    gguf_name = "qwen3"


class GemmaGGUF(GGUFArch):
    """Gemma, as llama.cpp's converter writes it: RMSNorm weights stored as 1 + w (HF keeps w and
    adds 1 at run time), the head size, no space prefix on the text. llama.cpp scales the
    embeddings by sqrt(hidden) itself, as HF does.

    llama.cpp's gemma graphs take the output matrix from token_embd and have no output tensor,
    so only a head equal to the embedding (no folded soul) can be written."""

    gguf_name = "gemma"

    def check(self, cfg: dict, sd) -> None:
        super().check(cfg, sd)
        if HEAD_KEY in sd and not torch.equal(sd.get(HEAD_KEY), sd.get(EMBED_KEY)):
            raise AgiasiError(GEMMA_HEAD_MESSAGE)

    def parameters(self, w, cfg: dict) -> None:
        head_dim = _head_dim(cfg)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)

    def skip(self, hf_name: str) -> bool:
        return hf_name == HEAD_KEY

    def transform(self, hf_name: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
        return t.float() + 1.0 if hf_name.endswith("norm.weight") else t


class Gemma2GGUF(GemmaGGUF):
    """Gemma-2: Gemma plus both soft-caps and the sliding window. llama.cpp scales the queries
    by 1/sqrt(head_dim) except for the 27 B shape, which is what HF's ``query_pre_attn_scalar``
    says for 2 B and 9 B: other values are refused."""

    gguf_name = "gemma2"

    def check(self, cfg: dict, sd) -> None:
        head_dim, scalar = _head_dim(cfg), cfg.get("query_pre_attn_scalar")
        if scalar is not None and int(cfg["num_hidden_layers"]) != 46 and float(scalar) != head_dim:
            raise AgiasiError(
                f"query_pre_attn_scalar {scalar} != head_dim {head_dim}: llama.cpp's gemma2 "
                "scales queries by 1/sqrt(head_dim) for every shape but the 27 B one"
            )
        super().check(cfg, sd)

    def parameters(self, w, cfg: dict) -> None:
        super().parameters(w, cfg)
        for add, key in (
            (w.add_attn_logit_softcapping, "attn_logit_softcapping"),
            (w.add_final_logit_softcapping, "final_logit_softcapping"),
        ):
            if cfg.get(key) is not None:
                add(float(cfg[key]))
        if cfg.get("sliding_window"):
            w.add_sliding_window(int(cfg["sliding_window"]))


def _head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))


GEMMA_HEAD_MESSAGE = (
    "llama.cpp's gemma and gemma2 architectures take their output matrix from the input "
    "embedding (token_embd) and have no output tensor, so a Gemma whose head carries a folded "
    "soul cannot be written as GGUF. Export the HF folder only (--gguf ''), or export a "
    "--no-soul run"
)

# The writer half of the architecture registry: each class names its llama.cpp architecture
# (``gguf_name``), and :data:`agiasi.architectures.ARCHITECTURES` entries name the one they are
# written as; :func:`writer_for` joins the two and tests/unit/gguf/test_gguf.py checks that every
# entry finds its writer and every writer serves an entry.
GGUF_WRITERS: dict[str, GGUFArch] = {
    w.gguf_name: w
    for w in (LlamaGGUF(), Phi3GGUF(), Qwen2GGUF(), Qwen3GGUF(), GemmaGGUF(), Gemma2GGUF())
}


def writer_for(entry) -> GGUFArch:
    """The GGUF writer of an :class:`agiasi.architectures.Architecture` entry."""
    if entry.gguf is None or entry.gguf not in GGUF_WRITERS:
        raise AgiasiError(
            f"agiasi has no GGUF writer for {entry.model_type}; export the HF folder only "
            "(--gguf '')"
        )
    return GGUF_WRITERS[entry.gguf]


def tensor_name_map(arch: GGUFArch, cfg: dict):
    """gguf-py's HF → GGUF tensor names for this architecture: the names the file gets, and so
    the names llama.cpp's quantizer and importance matrix use."""
    import gguf

    return gguf.get_tensor_name_map(
        gguf.MODEL_ARCH[arch.gguf_name.upper()], int(cfg["num_hidden_layers"])
    )
