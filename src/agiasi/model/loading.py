"""How a model is found and run on this machine: its config read (hub id or folder, with clear
errors), the device and the compute dtype. Every stage that opens a model goes through here.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import warnings
from pathlib import Path
from typing import Literal, get_args

import torch

from agiasi.errors import AgiasiError, first_line, shown

Quantization = Literal["nf4", "none"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
DTYPES: tuple[str, ...] = get_args(DType)


def _looks_like_path(model_id: str) -> bool:
    return (
        model_id.startswith((".", "/", "~"))
        or os.sep in model_id.strip("/").replace("/", "", 1)
        or Path(model_id).exists()
    )


def load_config(model_id: str, trust_remote_code: bool = False):
    """Read the HF config and check that it is a causal LM we can load."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(model_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AgiasiError(f"base model {model_id!r} is a file; pass the model folder")
        if not (path / "config.json").is_file():
            raise AgiasiError(
                f"{model_id!r} is not a model folder: it has no config.json "
                "(expected a Hugging Face checkpoint folder)"
            )
        check_config_sizes(_raw_config(path / "config.json", model_id), model_id)
    elif _looks_like_path(model_id):
        raise AgiasiError(f"base model not found: {model_id!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(
            str(path) if path.exists() else model_id, trust_remote_code=trust_remote_code
        )
    except ValueError as e:  # unknown model_type, or remote code refused
        hint = (
            " (its own code would have to run: pass --trust-remote-code only if you trust it)"
            if "trust_remote_code" in str(e) or "auto_map" in str(e)
            else ""
        )
        raise AgiasiError(
            f"unsupported architecture in {model_id!r}: {first_line(e)}{hint}"
        ) from None
    except OSError as e:  # hub id without network, missing files
        raise AgiasiError(
            f"could not load the config of {model_id!r}: {first_line(e)} "
            "(no network? pass a local model folder)"
        ) from None
    except Exception as e:  # transformers 5 validates field types with its own error class
        if type(e).__name__ != "StrictDataclassFieldValidationError":
            raise
        raise AgiasiError(f"{model_id!r}: config.json is not valid: {first_line(e)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise AgiasiError(
            f"unsupported architecture {archs} ({config.model_type!r}) in {model_id!r}: "
            "agiasi needs a causal language model (e.g. Phi3ForCausalLM, LlamaForCausalLM)"
        )
    check_config_sizes(config, model_id)
    return config


# The largest value each size takes in any model agiasi could train on one card — with a wide
# margin (Llama-3.1-405B: hidden 16,384, 126 layers, MLP 53,248; Gemma: 256 k vocabulary). A
# config past them is damaged or crafted: `hidden_size: 1e9` made `agiasi info` allocate
# gigabytes, `num_hidden_layers: 1e5` build for minutes.
CONFIG_SIZE_LIMITS = {
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 12,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
}


MAX_CONFIG_BYTES = 16 << 20


def _raw_config(path: Path, model_id: str) -> dict:
    """config.json as plain JSON, to check its sizes before transformers builds anything."""
    import json

    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AgiasiError(
            f"{model_id!r}: config.json is {path.stat().st_size:,} bytes; not a config"
        )
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise AgiasiError(
            f"{model_id!r}: config.json is not valid JSON ({first_line(e)})"
        ) from None
    return data if isinstance(data, dict) else {}


def check_config_sizes(config, model_id: str) -> None:
    """Every size a model is built from is a whole number within :data:`CONFIG_SIZE_LIMITS`,
    checked before anything is built from it (a config object, or config.json's own dict and
    its ``text_config``)."""
    if isinstance(config, dict):
        for inner in (config, config.get("text_config")):
            if isinstance(inner, dict):
                _check_sizes(inner.get, model_id)
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    _check_sizes(lambda key: getattr(text, key, None), model_id)


def _check_sizes(get, model_id: str) -> None:
    for key, limit in CONFIG_SIZE_LIMITS.items():
        value = get(key)
        if value is None:
            continue
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not whole or not 0 < value <= limit:
            raise AgiasiError(
                f"{model_id!r}: config.json gives {key} {shown(value, 40)}, which is not a size any "
                f"model agiasi builds has (a whole number from 1 to {limit:,}); the config is "
                "damaged or not this model's"
            )


def parse_device(device: str | torch.device | None) -> torch.device:
    """``None`` → the GPU if there is one, else the CPU; anything else must exist here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AgiasiError(f"{device!r} is not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AgiasiError(f"device {device!r}: no CUDA GPU is available here")
    if dev.type not in ("cpu", "cuda"):
        raise AgiasiError(f"device {device!r}: agiasi runs on cpu or cuda")
    return dev


def meta_model(hf_config, trust_remote_code: bool = False):
    """The causal LM ``hf_config`` describes, on PyTorch's meta device: every parameter's shape
    and the module tree, no memory and no weight read (a 3.8 B model in ~20 ms). What the
    shape checks, ``agiasi estimate`` and the studio's size estimates measure."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for ``name`` on ``device`` (``auto`` → what that device runs fastest).

    On the CPU ``auto`` is float32, for NF4 and full precision alike: most CPUs (AVX2 without
    AVX512-BF16/AMX: laptops, desktops, cloud VMs) have no native bf16 and run bf16 matmuls
    40–70× slower than fp32 — NF4 training took 19 s a step there instead of 0.55 s, because
    bitsandbytes' backward (``grad @ dequantize(W)``) runs in the compute dtype. bf16 on the CPU
    only when asked, with one warning where the CPU lacks it. On CUDA ``auto`` is bf16 where the
    card supports it, else fp16 (the design note's compute dtype).
    """
    device = torch.device(device)
    if name not in DTYPES:
        raise AgiasiError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    if name != "auto":
        dtype = getattr(torch, name)
        if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
            _warn_once(
                "warning: --dtype bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): "
                "bf16 matmuls are emulated there and run 40-70x slower than float32; "
                "leave --dtype at auto (float32 on the CPU) unless you need bf16"
            )
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(msg, file=sys.stderr, flush=True)


def check_config_fits_weights(model_id: str, hf_config) -> None:
    """A local base folder whose config.json disagrees with its weights (another hidden size, a
    vocabulary of another size) is refused before anything trains: built on the meta device
    (no memory), the model's tensor shapes are compared with the files' headers."""
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        return
    from agiasi.weights import LazyWeights

    weights = LazyWeights(folder)
    try:
        model = meta_model(hf_config)
    except Exception:  # a config transformers cannot build says so when the model loads
        return
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k} is {weights.shape(k)} in the files, {shapes[k]} by config.json"
        for k in weights.keys()
        if k in shapes and weights.shape(k) != shapes[k]
    ]
    if wrong:
        raise AgiasiError(
            f"{folder}: config.json does not describe these weights ({wrong[0]}"
            + (f"; {len(wrong) - 1} more" if len(wrong) > 1 else "")
            + "); fix config.json or fetch the model again"
        )


def open_model(
    source: str | os.PathLike,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    hf_config=None,
    what: str = "the model",
    **from_pretrained_kwargs,
):
    """The one way agiasi opens an HF causal LM, in eval mode, or one clear error (missing or
    damaged weights, a config it cannot read). A full-precision local folder goes to a GPU
    tensor by tensor (host memory holds one tensor, not the mapped files); everything else,
    and the CPU, through ``from_pretrained`` straight onto the device."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    path = Path(source).expanduser()
    local = path.is_dir()
    if device.type == "cuda" and local and "quantization_config" not in from_pretrained_kwargs:
        from agiasi.weights import load_streamed

        try:
            config = hf_config if hf_config is not None else load_config(str(path))
            model = load_streamed(path, config, dtype, device)
        except AgiasiError:
            model = None
        if model is not None:
            return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                str(path) if local else str(source),
                dtype=dtype,
                device_map={"": device},
                **from_pretrained_kwargs,
            )
    except (OSError, ValueError) as e:
        raise AgiasiError(f"could not load {what} {str(source)!r}: {first_line(e)}") from None
    except Exception as e:  # safetensors header errors, truncated files
        if "safetensors" in type(e).__module__ or "Safetensor" in type(e).__name__:
            raise AgiasiError(
                f"could not read the weights of {what} {str(source)!r} ({first_line(e)}): damaged "
                "or truncated (an interrupted download? fetch it again)"
            ) from None
        raise
    return model.eval()


def release_memory() -> None:
    """Give a freed model's memory back (call after ``del model``): collect its reference cycles,
    empty the CUDA cache, and on glibc return the freed heap to the OS — tensors under 32 MB come
    from the heap, which glibc keeps otherwise, so the next model would stack on top of it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def glibc():
    """The C library when it is glibc (``malloc_trim``, ``mallopt``), else None (asked once:
    ``platform.libc_ver`` reads the interpreter's binary)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
