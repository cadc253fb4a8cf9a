"""GGUF files: the streamed writer, one writer class per llama.cpp architecture, the vocabulary,
the table of file types, llama.cpp's quantizer, importance matrices, and a bounded header walk
for files agiasi did not write.
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    arch: GEMMA_HEAD_MESSAGE GGUF_WRITERS llama3_rope_factors rope_scaling_of trained_context writer_for
    file_types: GGUF_TYPE_TABLE KQUANT_TYPES parse_types
    header: check_gguf_header
    imatrix: DEFAULT_CHUNK Imatrix QuantizerImatrix calibration_chunks check_matches compute_imatrix gguf_names read_imatrix write_imatrix
    quantize: have_quantizer needs_imatrix_message quantize_gguf quiet_llama_cpp
    vocab: BPE_SPLIT_PATTERNS bpe_pre_tokenizer
    writer: GGUFStream write_gguf
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
