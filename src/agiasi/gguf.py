"""HF folder → GGUF through the ``gguf`` library; K-quants through llama.cpp's quantizer.

The file format, the tensor-name table (``gguf.get_tensor_name_map``), the quantizers for
Q8_0/BF16 (``gguf.quants``) and the special-token reader (``gguf.SpecialVocab``) are the
library's. Written here by hand — because no library exposes it as a function — is only the
per-architecture choice of metadata, the sentencepiece vocabulary table, and the Llama q/k
row permutation (HF's rotate-half RoPE layout → GGML's interleaved one). K-quants (Q4_K_M,
Q5_K_M, Q6_K) come from ``llama_cpp.llama_model_quantize``; nothing is built or downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from agiasi.errors import AgiasiError

DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
KQUANT_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
GGUF_TYPES = DIRECT_TYPES + KQUANT_TYPES
SENTENCEPIECE_ARCHS = ("phi3", "llama", "mistral")
SUPPORTED_ARCHS = ("phi3", "llama", "mistral", "qwen2")


def parse_types(text: str | list[str]) -> list[str]:
    items = text if isinstance(text, list) else [t.strip() for t in text.split(",")]
    types = [t.lower() for t in items if t]
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad:
        raise AgiasiError(
            f"unknown GGUF type(s) {', '.join(bad)}; choose from {', '.join(GGUF_TYPES)}"
        )
    return types


def _arch(model_type: str):
    import gguf

    table = {
        "phi3": gguf.MODEL_ARCH.PHI3,
        "llama": gguf.MODEL_ARCH.LLAMA,
        "mistral": gguf.MODEL_ARCH.LLAMA,
        "qwen2": gguf.MODEL_ARCH.QWEN2,
    }
    if model_type not in table:
        raise AgiasiError(
            f"GGUF export does not support architecture {model_type!r} yet "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    return table[model_type]


def rope_scaling_of(config: dict) -> dict | None:
    """LongRoPE parameters from either spelling: transformers 4's ``rope_scaling`` (type
    ``longrope`` or the older ``su``) or transformers 5's ``rope_parameters``."""
    for key in ("rope_scaling", "rope_parameters"):
        rs = config.get(key)
        if isinstance(rs, dict):
            kind = str(rs.get("rope_type", rs.get("type", ""))).lower()
            if kind in ("longrope", "su") and rs.get("long_factor") is not None:
                return rs
    return None


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


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores Llama q/k rows for rotate-half RoPE; GGML's LLAMA rope pairs adjacent rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _sentencepiece_vocab(hf_dir: Path, vocab_size: int):
    """tokens/scores/types from tokenizer.model, plus added tokens (special → CONTROL)."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    path = hf_dir / "tokenizer.model"
    if not path.is_file():
        raise AgiasiError(
            f"{hf_dir} has no tokenizer.model: llama.cpp's vocabulary for this architecture is "
            "the sentencepiece model. Copy tokenizer.model from the base model into the folder."
        )
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    t = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [t.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (
            t.UNKNOWN
            if sp.IsUnknown(i)
            else t.CONTROL
            if sp.IsControl(i)
            else t.UNUSED
            if sp.IsUnused(i)
            else t.BYTE
            if sp.IsByte(i)
            else t.NORMAL
        )
    tj = hf_dir / "tokenizer.json"
    if tj.is_file():
        for tok in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", []):
            i = int(tok["id"])
            if i >= vocab_size:
                continue
            tokens[i] = tok["content"].encode("utf-8")
            scores[i] = -1000.0
            types[i] = t.CONTROL if tok.get("special") else t.USER_DEFINED
    return tokens, scores, types


def write_gguf(
    hf_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    gguf_type: str = "f16",
    output_tensor_type: str | None = None,
) -> Path:
    """Write ``out_path`` (F32/F16/BF16/Q8_0) from a plain HF folder (no agiasi keys)."""
    import gguf

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if gguf_type not in DIRECT_TYPES:
        raise AgiasiError(
            f"write_gguf writes {', '.join(DIRECT_TYPES)}; {gguf_type} needs quantize_gguf"
        )
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    model_type = cfg.get("model_type", "")
    arch = _arch(model_type)
    n_layer = int(cfg["num_hidden_layers"])
    n_embd = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    vocab = int(cfg["vocab_size"])
    from agiasi.weights import LazyWeights

    sd = LazyWeights(hf_dir)
    leftovers = [k for k in sd.keys() if "lora_" in k or "soul" in k or "so8_rotation" in k]
    if leftovers:
        raise AgiasiError(
            f"refusing to write GGUF: agiasi/LoRA keys remain ({leftovers[0]}); merge first"
        )
    head_source = "lm_head.weight"
    if "lm_head.weight" not in sd:
        if not cfg.get("tie_word_embeddings", False):
            raise AgiasiError(f"{hf_dir} has no lm_head.weight and does not tie embeddings")
        head_source = "model.embed_tokens.weight"

    tmp = out_path.with_name(f".{out_path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    name = cfg.get("_name_or_path") or hf_dir.name
    w.add_name(str(Path(str(name)).name))
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(rope_theta_of(cfg))
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    w.add_file_type(ftype)
    extra: dict[str, torch.Tensor] = {}
    if model_type == "phi3":
        rot_pct = float(cfg.get("partial_rotary_factor", 1.0))
        rope_dims = int(rot_pct * n_embd) // n_head
        w.add_rope_dimension_count(rope_dims)
        orig = trained_context(cfg) or 4096
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))
        rs = rope_scaling_of(cfg)
        if rs is not None:
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
            extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"] = (
                torch.tensor(rs["long_factor"], dtype=torch.float32)
            )
            extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"] = (
                torch.tensor(rs["short_factor"], dtype=torch.float32)
            )
    else:
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(vocab)
        if cfg.get("head_dim") and head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)

    # vocabulary
    if model_type in SENTENCEPIECE_ARCHS or (hf_dir / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(hf_dir, vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
    else:
        raise AgiasiError(
            f"{hf_dir} has no tokenizer.model; GGUF export of BPE (tokenizer.json-only) vocabularies "
            "is not supported yet"
        )
    special = gguf.SpecialVocab(hf_dir, load_merges=False, n_vocab=vocab)
    special.add_to_gguf(w, quiet=True)
    if b"<|end|>" in tokens:
        w.add_eot_token_id(tokens.index(b"<|end|>"))

    # tensors
    name_map = gguf.get_tensor_name_map(arch, n_layer)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }
    # Two passes so memory holds one tensor at a time (a 3.8B model in F32 is 15 GB): first the
    # tensor infos (names, shapes, types, byte sizes) for the header, then the data, streamed.
    plan: list[tuple[str, str, gguf.GGMLQuantizationType]] = []
    sources = [
        k for k in sd.keys() if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"
    ]
    for hf_name in [*sources, "lm_head.weight", *extra]:
        if hf_name in extra:
            gname, shape = hf_name, tuple(extra[hf_name].shape)
        else:
            gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise AgiasiError(f"no GGUF name for tensor {hf_name!r} ({model_type})")
            shape = sd.shape(head_source if hf_name == "lm_head.weight" else hf_name)
        want = output_tensor_type if gname == "output.weight" and output_tensor_type else gguf_type
        if len(shape) <= 1 or gname.startswith("rope_factors"):
            ttype = gguf.GGMLQuantizationType.F32
        elif want == "q8_0" and shape[-1] % 32 != 0:
            ttype = gguf.GGMLQuantizationType.F16
        else:
            ttype = qtype[want]
        if ttype == gguf.GGMLQuantizationType.F32:
            dtype, nbytes = np.float32, 4 * math.prod(shape)
        elif ttype == gguf.GGMLQuantizationType.F16:
            dtype, nbytes = np.float16, 2 * math.prod(shape)
        else:  # quantized: the writer takes the byte shape and derives the element shape
            shape = gguf.quants.quant_shape_to_byte_shape(shape, ttype)
            dtype, nbytes = np.uint8, math.prod(shape)
        w.add_tensor_info(gname, shape, np.dtype(dtype), nbytes, raw_dtype=ttype)
        plan.append((hf_name, gname, ttype))

    def tensor_data(hf_name: str, ttype) -> np.ndarray:
        if hf_name in extra:
            t = extra[hf_name]
        else:
            t = sd.get(head_source if hf_name == "lm_head.weight" else hf_name)
        t = t.detach()
        if model_type in ("llama", "mistral"):
            if hf_name.endswith("q_proj.weight"):
                t = _permute_qk(t, n_head)
            elif hf_name.endswith("k_proj.weight"):
                t = _permute_qk(t, n_head_kv)
        # F32/F16 converted by torch (multithreaded, same IEEE rounding as numpy's astype,
        # which took 20 s on one core for a 3.8 B model); other types by gguf-py.
        if ttype == gguf.GGMLQuantizationType.F32:
            return t.to(torch.float32).contiguous().numpy()
        if ttype == gguf.GGMLQuantizationType.F16:
            return t.to(torch.float16).contiguous().numpy()
        return gguf.quants.quantize(t.to(torch.float32).numpy(), ttype)

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for hf_name, _gname, ttype in plan:
            w.write_tensor_data(tensor_data(hf_name, ttype))
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path


_LOG_CALLBACK = None


def quiet_llama_cpp() -> None:
    """Route llama.cpp's own logging (loader dumps, quantizer tables) to nowhere.

    Set AGIASI_LLAMA_LOG=1 to see it.
    """
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None or os.environ.get("AGIASI_LLAMA_LOG"):
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # noqa: ARG001
        return None

    _LOG_CALLBACK = _drop  # keep a reference: llama.cpp holds the raw pointer
    llama_cpp.llama_log_set(_drop, None)


def have_quantizer() -> bool:
    """Whether llama.cpp's quantizer (llama-cpp-python) is installed."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def quantize_gguf(
    src: str | os.PathLike,
    out_path: str | os.PathLike,
    gguf_type: str,
    output_tensor_type: str | None = None,
) -> Path:
    """Quantize ``src`` (an F16/F32 GGUF) with llama.cpp's own quantizer (llama-cpp-python):
    the K-quants, which only it makes, and Q8_0, which it makes multithreaded (gguf-py's numpy
    Q8_0 took ~40 s on one core for a 3.8 B model)."""
    try:
        import llama_cpp
    except ImportError:
        raise AgiasiError(
            f"{gguf_type.upper()} needs llama.cpp's quantizer: pip install llama-cpp-python "
            "(F32/F16/BF16/Q8_0 need only the gguf package)"
        ) from None
    ftypes = {
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    }
    ggml_types = {
        "f32": llama_cpp.GGML_TYPE_F32,
        "f16": llama_cpp.GGML_TYPE_F16,
        "bf16": getattr(llama_cpp, "GGML_TYPE_BF16", llama_cpp.GGML_TYPE_F16),
        "q8_0": llama_cpp.GGML_TYPE_Q8_0,
        "q4_k_m": llama_cpp.GGML_TYPE_Q4_K,
        "q5_k_m": llama_cpp.GGML_TYPE_Q5_K,
        "q6_k": llama_cpp.GGML_TYPE_Q6_K,
    }
    quiet_llama_cpp()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[gguf_type]
    params.nthread = os.cpu_count() or 1
    if output_tensor_type:
        params.output_tensor_type = ggml_types[output_tensor_type]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise AgiasiError(f"llama.cpp's quantizer failed ({rc}) making {out_path.name}")
    os.replace(tmp, out_path)
    return out_path
