"""K and IQ quants through llama.cpp's own quantizer (``llama_model_quantize`` in llama-cpp-python): no
tool binary is built or downloaded. Also llama.cpp's log, silenced unless ``AGIASI_LLAMA_LOG=1``.
"""

from __future__ import annotations

import ctypes
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
    imatrix=None,
) -> Path:
    """Quantize ``src`` (an F16/F32 GGUF) with llama.cpp's own quantizer (llama-cpp-python):
    the K and IQ types, which only it makes, and Q8_0, which it makes multithreaded (gguf-py's
    numpy Q8_0 took ~40 s on one core for a 3.8 B model).

    ``imatrix`` (an :class:`agiasi.gguf.imatrix.QuantizerImatrix`) goes to the quantizer as its C
    array, and the file records it under the keys ``llama-quantize --imatrix`` writes
    (``quantize.imatrix.*``), which ``agiasi info`` reads back.
    """
    from agiasi.gguf.file_types import GGUF_TYPE_TABLE

    try:
        import llama_cpp
    except ImportError:
        raise AgiasiError(
            f"{gguf_type.upper()} needs llama.cpp's quantizer: pip install llama-cpp-python "
            "(F32/F16/BF16/Q8_0 need only the gguf package)"
        ) from None
    row = GGUF_TYPE_TABLE[gguf_type]
    if row.needs_imatrix and imatrix is None:
        raise AgiasiError(needs_imatrix_message(gguf_type))
    quiet_llama_cpp()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{row.ftype}")
    params.nthread = os.cpu_count() or 1
    if output_tensor_type:
        params.output_tensor_type = _ggml_type(llama_cpp, output_tensor_type)
    overrides = None
    if imatrix is not None:
        params.imatrix = imatrix.pointer()
        overrides = _imatrix_keys(llama_cpp, imatrix)
        params.kv_overrides = ctypes.cast(
            overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override)
        )
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    del overrides  # kept alive until here: the quantizer reads the raw pointers
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise AgiasiError(f"llama.cpp's quantizer failed ({rc}) making {out_path.name}")
    os.replace(tmp, out_path)
    return out_path


def needs_imatrix_message(gguf_type: str, remedy: str = "use --imatrix auto or FILE") -> str:
    return (
        f"{gguf_type.upper()} needs an importance matrix: llama.cpp's quantizer refuses it "
        f"without one (its 2- and 3-bit codebooks are fitted to the activations); {remedy}"
    )


def _ggml_type(llama_cpp, name: str) -> int:
    """The GGML tensor type of an ``--output-tensor-type`` value (a file type's main type)."""
    main = {"q4_k_m": "Q4_K", "q4_k_s": "Q4_K", "q5_k_m": "Q5_K", "q5_k_s": "Q5_K"}
    main.update({"q3_k_m": "Q3_K", "q3_k_l": "Q3_K", "q2_k_s": "Q2_K", "iq3_m": "IQ3_S"})
    key = main.get(name, name.upper())
    if key == "BF16" and not hasattr(llama_cpp, "GGML_TYPE_BF16"):
        key = "F16"
    value = getattr(llama_cpp, f"GGML_TYPE_{key}", None)
    if value is None:
        raise AgiasiError(f"--output-tensor-type {name}: llama.cpp has no tensor type {key}")
    return value


def _imatrix_keys(llama_cpp, imatrix):
    """The metadata ``llama-quantize`` adds when it is given a matrix, as key overrides
    (an array ending in an entry with an empty key)."""
    Override = llama_cpp.llama_model_kv_override
    rows = [
        ("quantize.imatrix.file", "str", imatrix.file_name),
        ("quantize.imatrix.dataset", "str", imatrix.dataset),
        ("quantize.imatrix.entries_count", "int", imatrix.n_entries),
        ("quantize.imatrix.chunks_count", "int", imatrix.chunks),
    ]
    arr = (Override * (len(rows) + 1))()
    for o, (key, kind, value) in zip(arr, rows, strict=False):
        o.key = key.encode()
        if kind == "str":
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            o.value.val_str = value.encode()[:127]
        else:
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            o.value.val_i64 = int(value)
    arr[len(rows)].key = b""
    return arr
