"""The input embedding kept in host memory while the decoder runs on the GPU.

LoRA never trains the input embedding, and a step reads only its own tokens' rows of it: B·T·H
values (24 MiB at 4,096 tokens of Phi-3.5-mini) out of vocab·H (197 MB for Phi-3's 32,064 ×
3,072 in bf16; 1.05 GB for a Llama-3 vocabulary of 128,256 × 4,096, most Japanese 8 B models).

How: the matrix moves to pinned host memory and the module's parameter becomes a CUDA tensor
over that same memory. With unified virtual addressing (every 64-bit CUDA platform) a pinned page
has one address on the host and on the card, so the embedding's own CUDA gather reads its B·T
rows across the bus: no hooks, no host work, no wait for the GPU, and the card's allocator never
holds the matrix. The rows are the same in the same dtype (exact), and the module, its class
(Gemma-3's scaled embedding keeps its scaling), its parameter names and the state dict stay
what they were. Not for a head tied to the embedding (the head reads the whole matrix every
step) nor for a trained embedding.

Written by hand because PyTorch has no call that returns a CUDA tensor over pinned host memory;
it does wrap any device pointer handed to it through ``__cuda_array_interface__`` (the protocol
CuPy and Numba share), which is how :func:`host_view` gets one.

Measured on an H100 (bench/RESULTS.md, "The input embedding read in place"): the same model
switched between the two places in one process steps in 235.2 vs 235.5 ms at 4,096 tokens and
114 vs 116 ms at 512 (within that row's spread), where the first form (forward hooks: the
gather on the CPU, the rows copied over) cost 5-7 %. Both benchmark shapes run ahead of Unsloth
with it below Unsloth's memory ("Both shapes side by side"). It stays a flag, off by default:
the in-place read relies on the driver mapping pinned pages for the card, which only Linux
machines have exercised (the GPU tier); on the Windows and WSL2 drivers many of our users run
it is untested, and 0.18-1 GiB is not worth an untested path unasked. Out-of-memory messages
offer it.
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


def host_view(pinned: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on ``device`` (CUDA) over ``pinned`` host memory, not a copy: kernels that read
    it read across the bus. The protocol has no bf16, hence the int16 view."""
    as16 = pinned.view(torch.int16) if pinned.element_size() == 2 else pinned

    class Memory:
        keep = pinned  # the view does not own the memory; torch keeps this object alive
        __cuda_array_interface__ = {
            "shape": tuple(as16.shape),
            "typestr": f"<{'i' if as16.dtype == torch.int16 else 'f'}{as16.element_size()}",
            "data": (as16.data_ptr(), False),
            "version": 2,
            "strides": None,
        }

    view = torch.as_tensor(Memory(), device=device)
    if view.data_ptr() != pinned.data_ptr():  # a copy would put the matrix back on the card
        raise AgiasiError(
            f"--offload-embeddings: PyTorch copied the host matrix to {device} instead of "
            "reading it in place; leave the flag out"
        )
    return view.view(pinned.dtype)


def keep_input_embedding_on_host(model: nn.Module, device: torch.device) -> int:
    """Move ``model``'s input embedding to pinned host memory that ``device`` reads in place;
    returns the bytes it freed on ``device``. The wrapper calls it for CUDA runs only (on the
    CPU there is nothing to free)."""
    emb = model.get_input_embeddings()
    weight = emb.weight
    if head_reads_input_embedding(model):
        raise AgiasiError(
            "--offload-embeddings: this model ties its head to the input embedding (the head "
            "reads the whole matrix every step); leave the flag out"
        )
    if weight.requires_grad:
        raise AgiasiError("--offload-embeddings: the input embedding is being trained")
    if device.type != "cuda":
        raise AgiasiError(f"--offload-embeddings needs a CUDA device, not {device.type}")
    freed = weight.numel() * weight.element_size() if weight.device.type == "cuda" else 0
    pinned = weight.detach().to("cpu").pin_memory()
    emb.weight = nn.Parameter(host_view(pinned, device), requires_grad=False)
    return freed
