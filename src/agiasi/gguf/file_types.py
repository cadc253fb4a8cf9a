"""The one table of GGUF file types agiasi writes, and what llama.cpp says of each.

Who writes each type: gguf-py here (F32, F16, BF16, Q8_0 — agiasi.gguf.writer) or llama.cpp's own
quantizer from the F16 file (agiasi.gguf.quantize). Bits per weight (the export's free-disk check) are
upper estimates from llama.cpp's own figures (``tools/quantize/quantize.cpp``: nominal bpw, or
the file size it lists for Llama-3-8B); the mixes keep some tensors at more bits.

Which types need an importance matrix is llama.cpp's rule, not ours: ``llama-quant.cpp``'s
``tensor_requires_imatrix`` refuses a tensor quantized to IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S
or IQ3_XXS, or to Q2_K inside a Q2_K_S file, when no matrix is given. The file types whose
tensors land there are the ones below with ``needs_imatrix``; tests/integration/export/
test_imatrix.py checks the set against llama.cpp's quantizer itself. At or below 4 bits the
others still lose more without a matrix (llama.cpp: "highly recommended"): they are
``low_bit`` and get the matrix by default (``--imatrix auto``).
"""

from __future__ import annotations

from dataclasses import dataclass

from agiasi.errors import AgiasiError


@dataclass(frozen=True)
class GGUFType:
    name: str  # as --gguf takes it
    writer: str  # "gguf-py" or "llama.cpp"
    bpw: float  # bits per weight
    ftype: str | None = None  # llama.cpp's LLAMA_FTYPE_MOSTLY_<ftype> (quantizer types)
    needs_imatrix: bool = False
    low_bit: bool = False  # ≤ 4 bits a weight: the importance matrix is on by default

    @property
    def bytes_per_param(self) -> float:
        return self.bpw / 8


_ROWS = [
    GGUFType("f32", "gguf-py", 32.0),
    GGUFType("f16", "gguf-py", 16.0),
    GGUFType("bf16", "gguf-py", 16.0),
    GGUFType("q8_0", "gguf-py", 8.5, "Q8_0"),
    GGUFType("q6_k", "llama.cpp", 6.6, "Q6_K"),
    GGUFType("q5_k_m", "llama.cpp", 5.7, "Q5_K_M"),
    GGUFType("q5_k_s", "llama.cpp", 5.52, "Q5_K_S"),
    GGUFType("q4_k_m", "llama.cpp", 4.9, "Q4_K_M", low_bit=True),
    GGUFType("q4_k_s", "llama.cpp", 4.58, "Q4_K_S", low_bit=True),
    GGUFType("q4_0", "llama.cpp", 4.5, "Q4_0", low_bit=True),
    GGUFType("iq4_nl", "llama.cpp", 4.5, "IQ4_NL", low_bit=True),
    GGUFType("iq4_xs", "llama.cpp", 4.25, "IQ4_XS", low_bit=True),
    GGUFType("q3_k_l", "llama.cpp", 4.27, "Q3_K_L", low_bit=True),
    GGUFType("q3_k_m", "llama.cpp", 3.91, "Q3_K_M", low_bit=True),
    GGUFType("iq3_m", "llama.cpp", 3.66, "IQ3_M", low_bit=True),
    GGUFType("iq3_xxs", "llama.cpp", 3.06, "IQ3_XXS", needs_imatrix=True, low_bit=True),
    GGUFType("q2_k", "llama.cpp", 3.35, "Q2_K", low_bit=True),
    GGUFType("q2_k_s", "llama.cpp", 3.2, "Q2_K_S", needs_imatrix=True, low_bit=True),
    GGUFType("iq2_m", "llama.cpp", 2.7, "IQ2_M", needs_imatrix=True, low_bit=True),
    GGUFType("iq2_xs", "llama.cpp", 2.31, "IQ2_XS", needs_imatrix=True, low_bit=True),
]
GGUF_TYPE_TABLE: dict[str, GGUFType] = {r.name: r for r in _ROWS}
GGUF_TYPES = tuple(GGUF_TYPE_TABLE)
DIRECT_TYPES = tuple(t for t, r in GGUF_TYPE_TABLE.items() if r.writer == "gguf-py")
KQUANT_TYPES = tuple(t for t, r in GGUF_TYPE_TABLE.items() if r.writer == "llama.cpp")


def parse_types(text: str | list[str]) -> list[str]:
    items = text if isinstance(text, list) else [t.strip() for t in text.split(",")]
    types = [t.lower() for t in items if t]
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad:
        raise AgiasiError(
            f"unknown GGUF type(s) {', '.join(bad)}; choose from {', '.join(GGUF_TYPES)}"
        )
    return types
