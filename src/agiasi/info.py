"""``agiasi info``: what agiasi would build on a model, read from its config alone; for a GGUF
file, what it holds (its tensor types, and whether an importance matrix made them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from agiasi.model.config import ModelConfig, lora_targets_for, match_lora_targets
from agiasi.model.loading import load_config
from agiasi.soul import Soul


def describe(model_id: str, config: ModelConfig | None = None) -> dict[str, Any]:
    """What ``agiasi info`` prints. Needs only the model's config: the model is built on the
    meta device, so Phi-3.5-mini's numbers come without touching 7 GB of weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = config or ModelConfig(base_model=model_id)
    cfg.validate()
    hf = load_config(model_id, cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=cfg.trust_remote_code)
        targets = lora_targets_for(hf, cfg.lora_targets)
        counts = match_lora_targets(model, targets)
        head = model.get_output_embeddings()
        hidden = int(head.weight.shape[1])
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                target_modules=targets,
                lora_dropout=cfg.lora_dropout,
                task_type="CAUSAL_LM",
            ),
        )
        lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        base = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n)
    info: dict[str, Any] = {
        "model": model_id,
        "architecture": (hf.architectures or [type(model).__name__])[0],
        "model_type": hf.model_type,
        "hidden_size": hidden,
        "num_layers": getattr(hf, "num_hidden_layers", None),
        "vocab_size": getattr(hf, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "base_parameters": base,
        "lora_targets": counts,
        "gguf_export": _gguf_support(hf.model_type),
        "lora_r": cfg.lora_r,
        "lora_parameters": lora,
    }
    if cfg.soul:
        soul = Soul(cfg.soul_config(hidden))
        info.update(
            soul_rotation=cfg.rotation,
            soul_alpha_mode=cfg.alpha_mode,
            soul_parameters=soul.num_trainable()
            if cfg.alpha_mode == "learned"
            else sum(p.numel() for p in soul.rotation.parameters()),
            alpha=float(soul.alpha.detach()),
            gate=float(soul.gate().detach()),
            phase=soul.phase(),
        )
    return info


def _gguf_support(model_type: str) -> str:
    from agiasi.architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        return "no (not in agiasi's architecture table)"
    plain = arch.exports_gguf and not arch.gguf_tied_head_only
    return arch.gguf_support if plain else f"{arch.gguf_support} ({arch.notes})"


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """A GGUF file's architecture, file type, tensors per GGML type, and the importance matrix
    llama.cpp's quantizer recorded (``quantize.imatrix.*``, None when none was used)."""
    from collections import Counter

    import gguf

    from agiasi.errors import AgiasiError

    p = Path(path)
    if not p.is_file():
        raise AgiasiError(f"{p}: no such GGUF file")
    from agiasi.gguf.header import check_gguf_header

    check_gguf_header(p, "GGUF")  # counts bounded by the file's size before the reader trusts them
    try:
        r = gguf.GGUFReader(str(p))
    except (OSError, ValueError) as e:
        raise AgiasiError(f"{p} is not a readable GGUF file: {e}") from None

    def value(key: str):
        f = r.fields.get(key)
        return f.contents() if f is not None else None

    ftype = value("general.file_type")
    imatrix = None
    if value("quantize.imatrix.entries_count") is not None:
        imatrix = {
            "entries": value("quantize.imatrix.entries_count"),
            "chunks": value("quantize.imatrix.chunks_count"),
            "dataset": value("quantize.imatrix.dataset"),
            "file": value("quantize.imatrix.file"),
        }
    types = Counter(t.tensor_type.name for t in r.tensors)
    return {
        "file": str(p),
        "type": value("general.type") or "model",
        "architecture": value("general.architecture"),
        "file_type": gguf.LlamaFileType(ftype).name if ftype is not None else None,
        "tensors": len(r.tensors),
        "tensor_types": dict(sorted(types.items())),
        "imatrix": imatrix,
        "size_bytes": p.stat().st_size,
    }


def info(cfg: ModelConfig, out=print) -> None:
    """What ``agiasi info`` prints: a GGUF file's tensors, or what agiasi would build on a model
    (from its config alone)."""
    if str(cfg.base_model).endswith(".gguf"):  # a GGUF file: its tensors, not a model to build
        out(format_info(describe_gguf(cfg.base_model)))
        return
    out(format_info(describe(cfg.base_model, cfg)))


def format_info(info: dict[str, Any]) -> str:
    return json.dumps(info, ensure_ascii=False, indent=2)
