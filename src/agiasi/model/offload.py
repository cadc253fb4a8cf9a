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

import weakref
from typing import Any

import torch

from agiasi.errors import AgiasiError


class _Saved:
    """One layer's input in host memory, and its way back."""

    def __init__(self, host: torch.Tensor, device: torch.device, copied) -> None:
        self.host: torch.Tensor | None = host
        self.device = device
        self.copied = copied  # event: the copy to the host is done
        self.on_device: torch.Tensor | None = None
        self.fetched = None  # event: the copy back is done


class _Offloader:
    """The side stream the copies run on, and the layers whose inputs sit in host memory.

    Why a side stream: a copy enqueued on the compute stream stalls every kernel behind it
    (a 4,096-token layer input of Phi-3.5-mini is 24 MiB, ~0.5 ms over PCIe, 64 copies a step:
    ~10 % of the step). On its own stream it overlaps the next layer's compute. Why the stack:
    the backward recomputes layers in the reverse order of the forward, so while layer i is
    recomputed the input of layer i-1 (the one below it on the stack) is already on its way.
    The stack holds weak references: a forward whose graph is dropped without a backward
    leaves nothing behind.
    """

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        self.stack: list[weakref.ref] = []

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def offload(self, hidden: torch.Tensor) -> _Saved:
        host = torch.empty(
            hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=hidden.is_cuda
        )
        copied = None
        if hidden.is_cuda:
            side = self._side(hidden.device)
            side.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(side):
                host.copy_(hidden, non_blocking=True)
            hidden.record_stream(side)  # its memory is not reused before the copy has read it
            copied = side.record_event()
        else:
            host.copy_(hidden)
        saved = _Saved(host, hidden.device, copied)
        self.stack.append(weakref.ref(saved))
        return saved

    def _fetch(self, saved: _Saved) -> None:
        """Start bringing ``saved`` back to its device (no wait); idempotent."""
        if saved.on_device is not None or saved.host is None:
            return
        if saved.device.type != "cuda":
            saved.on_device = saved.host.to(saved.device)
            return
        # allocated from the compute stream's pool (a side-stream pool's blocks would sit idle
        # beside it: +0.25 GiB reserved at 4,096 tokens), filled on the side stream
        dst = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=saved.device)
        side = self._side(saved.device)
        side.wait_stream(torch.cuda.current_stream(saved.device))
        with torch.cuda.stream(side):
            side.wait_event(saved.copied)
            dst.copy_(saved.host, non_blocking=True)
        dst.record_stream(side)
        saved.on_device = dst
        saved.fetched = side.record_event()

    def take(self, saved: _Saved) -> torch.Tensor:
        """``saved``'s tensor on its device, ready for the compute stream; prefetches the next."""
        refs = [r() for r in self.stack]
        # entries above it: newer forwards that never saw a backward (dropped)
        keep = refs.index(saved) if saved in refs else len(refs)
        self.stack = [
            r for r, x in zip(self.stack[:keep], refs[:keep], strict=True) if x is not None
        ]
        self._fetch(saved)
        h = saved.on_device
        if saved.fetched is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.fetched)
        saved.host = saved.on_device = None
        if self.stack and (below := self.stack[-1]()) is not None:
            self._fetch(below)
        return h


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, offloader: _Offloader, run, anchor: torch.Tensor | None, hidden: torch.Tensor, *args
    ) -> torch.Tensor:
        # ``anchor`` is never read: as an input that requires grad it makes the output require
        # one when ``hidden`` does not (offloaded_checkpoint says why)
        ctx.run = run
        ctx.args = args
        ctx.device = hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.offloader = offloader
        # the recompute runs in the backward's thread: it must see the forward's autocast
        kind = hidden.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.saved = offloader.offload(hidden)
        with torch.no_grad():
            out = run(hidden, *args)
        if not isinstance(out, torch.Tensor):
            raise TypeError("offloaded checkpointing expects a decoder layer that returns a tensor")
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # the first layer's input (a frozen embedding's rows) needs no gradient: without one
        # the recompute's graph leaves out that layer's input-side backward
        wants_dx = ctx.needs_input_grad[3]
        h = ctx.offloader.take(ctx.saved).detach().requires_grad_(wants_dx)
        ctx.saved = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            kind, enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
                out = ctx.run(h, *ctx.args)
        if out.requires_grad:  # a layer with nothing to train and no dX wanted has no graph
            torch.autograd.backward(out, grad_out)
        return (None, None, None, h.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(
    run, hidden: torch.Tensor, *args: Any, offloader: _Offloader
) -> torch.Tensor:
    """Drop-in for HF's ``_gradient_checkpointing_func(partial(forward, **kwargs), hidden)``."""
    if not torch.is_grad_enabled():  # no backward will come: nothing to keep
        return run(hidden, *args)
    # The first layer's input comes from a frozen embedding and needs no gradient, but the
    # layer's output must require one or its LoRA never sees a backward pass. An empty tensor
    # that requires grad stands in: marking the rows themselves would make them a leaf that
    # autograd keeps alive (B·T·H on the card) until the backward ends.
    anchor = None
    if not hidden.requires_grad:
        anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(offloader, run, anchor, hidden, *args)


def enable_offloaded_checkpointing(decoder: torch.nn.Module) -> int:
    """Route every decoder layer's checkpoint through :func:`offloaded_checkpoint` (one
    offloader, so layer i's backward can prefetch layer i-1's input)."""
    from functools import partial

    func = partial(offloaded_checkpoint, offloader=_Offloader())
    n = 0
    for layer in decoder.layers:
        if not getattr(layer, "gradient_checkpointing", False):
            raise RuntimeError("enable gradient checkpointing before offloading its activations")
        layer._gradient_checkpointing_func = func
        n += 1
    return n


def available_host_memory() -> int | None:
    """MemAvailable in bytes (Linux), None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(
    hidden: int, layers: int, tokens: int, itemsize: int, available: int | None = None
) -> str:
    """Refuse a run whose offloaded layer inputs would not fit in host memory, before the model
    loads: pinned pages cannot be swapped, so an overflow kills the machine's other programs
    (or this one) halfway through a step instead of failing here with a reason."""
    need = hidden * layers * tokens * itemsize
    available = available_host_memory() if available is None else available
    if available is not None and need > 0.8 * available:
        raise AgiasiError(
            f"--offload-activations would keep {_size(need)} of layer inputs in pinned host "
            f"memory ({tokens:,} tokens a micro-batch × {layers} layers × {hidden} × {itemsize} "
            f"bytes), but only {_size(available)} is available: lower --max-length or "
            "--batch-size, or leave out --offload-activations"
        )
    have = f", {_size(available)} available" if available is not None else ""
    return f"offloaded checkpoints: up to {_size(need)} of pinned host memory a micro-batch{have}"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"
