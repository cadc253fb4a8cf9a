"""K-quants through llama.cpp's own quantizer (``llama_model_quantize`` in llama-cpp-python): no
tool binary is built or downloaded. Also llama.cpp's log, silenced unless ``AGIASI_LLAMA_LOG=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

from agiasi.errors import AgiasiError

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
    """Whether llama-cpp-python imports (installed *and* loadable: a package whose own
    dependencies or shared library are missing counts as absent, not as a crash later)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


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
