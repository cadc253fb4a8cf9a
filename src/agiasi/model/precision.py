"""How the LoRA and NF4 layers compute inside the model: one place for the dtype decisions.

PEFT keeps the LoRA weights (and so their gradients and Adam's state) in float32 and, outside
autocast, casts every LoRA input to float32: in a bf16 model that is 16 float32 GEMMs a layer per
step, 6 % of a 512 × 8 step on an H200. So training runs the decoder under bf16 autocast
(:func:`lora_autocast`) with PEFT's cast off (:func:`lora_inputs_in_compute_dtype`): the LoRA
matmuls run in bf16 on bf16 casts of the float32 weights, the mixed precision HF's Trainer
(``bf16=True``) and Unsloth train with. Anything that runs the decoder outside that autocast
(HF's ``generate``) turns PEFT's cast back on for its length (:func:`peft_input_cast`), or bf16
activations meet float32 weights. float32 compute (the CPU default) is left exactly as it was,
and an NF4 model computing in float32 stays in float32 on every CPU
(:func:`keep_nf4_in_float32`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def lora_inputs_in_compute_dtype(model: nn.Module) -> None:
    """PEFT's cast of LoRA inputs off: under :func:`lora_autocast` they stay bf16 on every
    device (PEFT's own test for autocast reads CUDA's state only)."""
    for m in _lora_layers(model):
        m.cast_input_dtype_enabled = False


def lora_autocast(compute_dtype: torch.dtype, device: torch.device):
    """bf16 autocast over the decoder when the model computes in bf16; the soul, the head and
    the loss run outside it, in their own dtypes."""
    if compute_dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def peft_input_cast(model: nn.Module) -> Iterator[None]:
    """PEFT's cast of every LoRA input to the LoRA weights' dtype, on for the block's length
    and then back to what it was."""
    layers = _lora_layers(model)
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m.cast_input_dtype_enabled = b


def keep_nf4_in_float32(model: nn.Module) -> None:
    """bitsandbytes switches a 4-bit layer run without gradients on a CPU with AVX512-BF16 to a
    bf16 kernel (inputs cast to bf16), whatever the compute dtype: logits then move by ~0.4 % of
    their range between a laptop and a server, and between eval and training. float32 compute
    must mean float32, so that path is turned off here (bitsandbytes' own switch)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
