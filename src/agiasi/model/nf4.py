r"""The NF4 linear written as plain tensor arithmetic, so ``torch.compile`` fuses it.

bitsandbytes stores a 4-bit weight ``W`` (N × K, row-major, flattened to ``w_i``) as::

    packed[j]  = (q_{2j} << 4) | q_{2j+1}          # two 4-bit codes a byte, the even one high
    w_i        = NF4[q_i] · s_{i // 64}            # NF4: its 16-entry table, s: one scale a block
    s_b        = C2[a_b] · m_{b // 256} + offset   # double quantization: the scales are uint8
                                                   # codes a_b of a 256-entry table C2, with one
                                                   # float32 scale m a block of 256 scales

and its training forward is ``y = x Wᵀ``, backward ``∂x = ∂y W`` (the 4-bit weight is frozen, so
there is no ``∂W``). Every step of ``W`` is elementwise (two table lookups, a shift, a mask, two
multiplies, computed in float32 and cast once, as bitsandbytes' kernel does), so this module
writes it as torch ops and the layer's ``torch.compile`` turns it into one generated kernel per
linear, launched from the compiled graph with no Python between kernels.

Why not bitsandbytes' own op: under ``torch.compile`` ``bitsandbytes::gemm_4bit`` stays an
opaque custom op whose Python dispatch costs ~100 µs a call (profiled on an H200: Llama-shaped
4096-token steps are host-bound, 7,424 kernels a step), and its backward dequantizes in two
kernels (the scales, then the weight). No library in our dependencies offers a traceable NF4
dequantization: Unsloth's is a hand-written Triton kernel tied to its own model patching.

Exact: the same table entries, the same float32 products and the same final cast as
``bitsandbytes.functional.dequantize_4bit`` — tests/unit/model/test_nf4.py checks bit equality, and the
autograd function against ``bnb.matmul_4bit``'s output and input gradient.

No N × K weight outlives its matmul: in eager mode :class:`NF4Matmul` saves only the packed
weight and its scales (what bitsandbytes saves) and dequantizes again in the backward. Compiled,
a custom autograd function does not keep that promise — AOTAutograd merges the two identical
dequantizations and, since the backward's matmul needs the weight materialized anyway, saves the
forward's N × K weight instead (its partitioner bans recomputing what a matmul consumes). So the
compiled path dequantizes under ``torch.utils.checkpoint``, whose region the partitioner must
recompute: the graph then saves the uint8 codes, as the eager function does.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

_NESTED_BLOCK = 256  # the block of the second quantization (the only one bitsandbytes nests)


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The N × K weight from its packed codes and double-quantized scales (module docstring),
    in ``dtype``: bitsandbytes' matmul dequantizes straight into the compute dtype."""
    scale = block_scales(absmax, code2, absmax2, offset)
    p = packed.reshape(absmax.numel(), blocksize // 2)
    hi = code[(p >> 4).long()] * scale  # the even element of each byte
    lo = code[(p & 15).long()] * scale
    if dtype.itemsize == 2 and sys.byteorder == "little":
        return _interleave16(hi.to(dtype), lo.to(dtype)).reshape(shape)
    return torch.stack((hi, lo), dim=-1).to(dtype).reshape(shape)


def block_scales(
    absmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The float32 scale of each block, (blocks, 1): ``C2[a_b] · m_{b // 256} + offset``."""
    scale = code2[absmax.long()] * absmax2.repeat_interleave(_NESTED_BLOCK)[: absmax.numel()]
    return (scale + offset).unsqueeze(-1)


def _interleave16(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """``stack((even, odd), -1)`` for a 2-byte dtype, written as one int32 a pair.

    Why: compiled, a ``stack`` becomes a kernel over the output's elements in which each one
    reloads its byte, its scale and both tables and picks one of two results: 0.45× the card's
    copy bandwidth. Two values packed into one int32 (the even one in the low half:
    little-endian, as every CUDA and x86 device is) make the generated kernel work a byte at a
    time and store 4 bytes at once: 0.72–0.94×, a Phi-3.5-mini layer's four dequantizations in
    107 µs instead of 212 on an H100 (bitsandbytes' own kernel: 154; bench/RESULTS.md). Viewing
    the int32 tensor as the 2-byte dtype is free; the bits are the same."""
    dtype = even.dtype
    low = even.view(torch.int16).to(torch.int32) & 0xFFFF
    high = odd.view(torch.int16).to(torch.int32) << 16
    return (low | high).view(dtype)


class NF4Matmul(torch.autograd.Function):
    """``x Wᵀ + b`` with ``W`` dequantized in the forward and again in the backward; ``x`` and
    ``W`` are cast to the compute dtype first, as bitsandbytes' ``Linear4bit`` does. The bias is
    frozen (it gets no gradient, as in QLoRA)."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, code2, absmax2, offset, code, meta):
        ctx.save_for_backward(packed, absmax, code2, absmax2, offset, code)
        ctx.meta = meta
        shape, blocksize, compute = meta
        w = dequantize(packed, absmax, code2, absmax2, offset, code, shape, blocksize, compute)
        return _linear(x, w, bias, compute)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            shape, blocksize, compute = ctx.meta
            w = dequantize(*ctx.saved_tensors, shape, blocksize, compute)
            grad_x = grad_out.to(compute) @ w
        return grad_x, None, None, None, None, None, None, None, None


def _linear(x, w, bias, compute: torch.dtype) -> torch.Tensor:
    """Linear4bit's call in the compute dtype (input and bias cast, as bitsandbytes does)."""
    b = None if bias is None else bias.to(compute)
    return torch.nn.functional.linear(x.to(compute), w, b)


def _tensors(module: nn.Module) -> tuple | None:
    """The plain tensors of a bitsandbytes ``Linear4bit`` this module can run, or None."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or not state.nested:
        return None
    if state.state2.blocksize != _NESTED_BLOCK or len(state.shape) != 2:
        return None
    n, k = (int(d) for d in state.shape)
    if (n * k) % state.blocksize:  # a partial last block: leave it to bitsandbytes
        return None
    packed = module.weight.data.reshape(-1)
    return (
        (
            packed,
            state.absmax,
            state.state2.code,
            state.state2.absmax,
            state.offset.reshape(()).to(torch.float32),
            state.code.to(device=packed.device, dtype=torch.float32),
        ),
        (n, k),
        int(state.blocksize),
    )


def nf4_linear(x: torch.Tensor, bias: torch.Tensor | None, tensors: tuple, meta: tuple):
    """``x Wᵀ + b`` in the compute dtype ``meta[2]``: eager through :class:`NF4Matmul`, compiled
    as a recomputed dequantization and a plain linear (module docstring)."""
    if not torch.compiler.is_compiling():
        return NF4Matmul.apply(x, bias, *tensors, meta)
    from torch.utils.checkpoint import checkpoint

    w = checkpoint(dequantize, *tensors, *meta, use_reentrant=False, preserve_rng_state=False)
    return _linear(x, w, bias, meta[2])


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    tensors, shape, blocksize = self._agiasi_nf4
    meta = (shape, blocksize, self.compute_dtype or x.dtype)
    return nf4_linear(x, self.bias, tensors, meta).to(x.dtype)


def lora_addmm(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``y + scaling · (x Aᵀ) Bᵀ`` as one ``addmm``: the LoRA product is added in the GEMM's
    epilogue rather than by a separate pass over the output (PEFT's ``result + B(A x) · s``
    writes ``B(A x)``, then reads it and ``y`` back). Under autocast the product runs in the
    autocast dtype, as PEFT's does."""
    out = torch.addmm(
        y.reshape(-1, y.shape[-1]),
        torch.nn.functional.linear(x, a).reshape(-1, a.shape[0]),
        b.t(),
        alpha=scaling,
    )
    return out.reshape(y.shape)


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's QLoRA forward (one adapter, not merged) with the LoRA product fused by
    :func:`lora_addmm`; anything else, and eager mode, goes to PEFT's own forward."""
    name = self._agiasi_adapter
    if (
        args
        or kwargs
        or not torch.compiler.is_compiling()
        or self.disable_adapters
        or self.merged
        or list(self.active_adapters) != [name]
    ):
        return type(self).forward(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != a.dtype:
        return type(self).forward(self, x)  # PEFT casts between dtypes here: keep its way
    y = self.base_layer(x)  # in x's dtype (_forward)
    return lora_addmm(y, self.lora_dropout[name](x), a, b, self.scaling[name])


def use_traceable_nf4(model: nn.Module) -> int:
    """Run every NF4 ``Linear4bit`` of ``model`` through :func:`nf4_linear`, and the QLoRA layers
    around them through :func:`lora_addmm`, when compiled; returns how many NF4 linears.

    The modules keep their weights, names and state dicts (merge and export read them as
    before); only ``forward`` is replaced on the instance, and eager mode still runs PEFT's and
    :class:`NF4Matmul`. Layers bitsandbytes stores otherwise (FP4, no double quantization, a
    partial block) keep bitsandbytes' forward."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        found = _tensors(module)
        if found is None:
            continue
        module._agiasi_nf4 = found
        module.forward = types.MethodType(_forward, module)
        count += 1
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, LoraLayer) and getattr(base, "_agiasi_nf4", None) is not None:
            if len(module.lora_A) == 1 and not module.lora_variant:
                module._agiasi_adapter = next(iter(module.lora_A))
                module.forward = types.MethodType(_lora_forward, module)
    return count
