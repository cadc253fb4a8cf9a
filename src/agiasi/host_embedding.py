"""The input embedding kept in host memory while the decoder runs on the GPU.

LoRA never trains the input embedding, and a step reads only its own tokens' rows of it: B·T·H
values (24 MiB at 4,096 tokens of Phi-3.5-mini) out of vocab·H (197 MB for Phi-3's 32,064 ×
3,072 in bf16; 1.05 GB for a Llama-3 vocabulary of 128,256 × 4,096, most Japanese 8 B models).
Kept on the host, the lookup runs on the CPU (several threads) into pinned memory and only the
looked-up rows cross to the GPU, queued behind its work. The result is the same rows in the same
dtype: exact.

How: two hooks on the model's own embedding module, so its class (Gemma-3's scaled embedding
keeps its scaling), its parameter names and the state dict stay what they were. Not for a head
tied to the embedding (the head reads the whole matrix every step) nor for a trained embedding.
The cost is one wait for the GPU when the ids arrive on it (the trainer's come from the host, a
pinned batch, and need none) and the host's gather. Measured on an H100 (bench/RESULTS.md, "Both
shapes again"): 5-7 % of a 4,096-token step, more than the gather and copy account for; hence a
flag, off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from agiasi.errors import AgiasiError


def head_reads_input_embedding(model: nn.Module) -> bool:
    """Whether the output head multiplies by the input embedding's own matrix (tied weights):
    such a head reads all of it every step, so it cannot stay on the host."""
    head = model.get_output_embeddings()
    head = getattr(head, "head", head)  # the soul's head wraps the plain one
    return head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight


def keep_input_embedding_on_host(model: nn.Module, device: torch.device) -> int:
    """Move ``model``'s input embedding to host memory and route its lookups through it; returns
    the bytes it freed on ``device``. The wrapper calls it for GPU runs only (on the CPU there
    is nothing to free); tests call it with the CPU as ``device`` to run the hooks."""
    emb = model.get_input_embeddings()
    weight = emb.weight
    if head_reads_input_embedding(model):
        raise AgiasiError(
            "--offload-embeddings: this model ties its head to the input embedding (the head "
            "reads the whole matrix every step); leave the flag out"
        )
    if weight.requires_grad:
        raise AgiasiError("--offload-embeddings: the input embedding is being trained")
    freed = weight.numel() * weight.element_size() if weight.device.type != "cpu" else 0
    emb.to("cpu")
    pin = device.type == "cuda"

    def to_host(module, args):
        if not args:  # called with keywords only: nn.Embedding's forward then fails by itself
            return None
        ids, *rest = args
        # a batch from the data stream is already here; ids on the GPU wait for it
        return (ids.to("cpu"), *rest)

    def to_device(module, args, rows: torch.Tensor) -> torch.Tensor:
        if not pin:
            return rows.to(device)
        pinned = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        pinned.copy_(rows)
        # the host allocator keeps `pinned` until the copy has read it (it records the stream)
        return pinned.to(device, non_blocking=True)

    emb.register_forward_pre_hook(to_host)
    emb.register_forward_hook(to_device)
    return freed
