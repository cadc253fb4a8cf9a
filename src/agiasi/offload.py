"""Activation checkpointing whose saved layer inputs live in CPU memory.

With gradient checkpointing each decoder layer keeps only its input hidden state for the
backward pass — T × H × 2 bytes a layer, 6.4 GB for Phi-3.5-mini at 32k tokens, which alone
overflows a 12 GB card next to the weights. Here that input is copied to pinned CPU memory
in the forward pass and brought back when the layer is recomputed, so GPU memory holds only
the weights and one layer's recomputation. PyTorch's ``save_on_cpu`` cannot do this: the
non-reentrant checkpoint keeps its inputs by reference, not through saved-tensor hooks.

The recomputation replays the RNG (LoRA dropout) exactly as ``torch.utils.checkpoint`` does.
"""

from __future__ import annotations

from typing import Any

import torch


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        ctx.run = run
        ctx.args = args
        ctx.device = hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        buf = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=hidden.is_cuda)
        buf.copy_(hidden, non_blocking=True)
        ctx.saved_hidden = buf
        with torch.no_grad():
            out = run(hidden, *args)
        if not isinstance(out, torch.Tensor):
            raise TypeError("offloaded checkpointing expects a decoder layer that returns a tensor")
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h = ctx.saved_hidden.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                out = ctx.run(h, *ctx.args)
        torch.autograd.backward(out, grad_out)
        ctx.saved_hidden = None
        return (None, h.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(run, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
    """Drop-in for HF's ``_gradient_checkpointing_func(partial(forward, **kwargs), hidden)``."""
    if not hidden.requires_grad:
        # The first layer's input comes from a frozen embedding; without this the layer's
        # output would not require grad and its LoRA would never see a backward pass.
        hidden = hidden.detach().requires_grad_(True)
    return _OffloadedCheckpoint.apply(run, hidden, *args)


def enable_offloaded_checkpointing(decoder: torch.nn.Module) -> int:
    """Route every decoder layer's checkpoint through :func:`offloaded_checkpoint`."""
    n = 0
    for layer in decoder.layers:
        if not getattr(layer, "gradient_checkpointing", False):
            raise RuntimeError("enable gradient checkpointing before offloading its activations")
        layer._gradient_checkpointing_func = offloaded_checkpoint
        n += 1
    return n
