"""Sequence-tiled MLP: each decoder layer's MLP run on tiles of positions, each tile under its
own activation checkpoint, so a long sequence's MLP intermediates exist for one tile at a time.

Why: with gradient checkpointing (and the layer inputs offloaded), what is left at 32k–64k
tokens is one layer's recomputation, and most of it is the MLP's — Phi-3.5-mini's gate_up
output (T × 2·8192), the activation (T × 8192) and their gradients, ~100 KB a token in bf16
(measured on 1× H200: the backward peak grows 174 KB a token, 8.8 GiB at 32k, 12.1 GiB at 49k).
Tiled, the layer's recomputation keeps only each tile's input; the tile's internals are
recomputed in its own backward.

Exact by construction: the MLP maps each position on its own (``down(act(gate(x)) · up(x))``),
so cutting the (B·T) positions into tiles changes nothing but the matmuls' row counts (their
rounding: fp32-reduction-order differences, ~1e-7 relative). The cost is one more MLP forward
per layer in the backward, paid only by sequences longer than the tile.

The MLP module keeps its place and names (the LoRA weights and checkpoints see the same keys):
its ``forward`` is replaced on the instance, as HF replaces a layer's checkpoint function.
"""

from __future__ import annotations

import types

import torch
from torch import nn

DEFAULT_TILE = 8192  # tokens; shorter batches run the MLP as it is


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= self._agiasi_tile:
        return self._agiasi_forward(x)
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled()
    outs = []
    for start in range(0, flat.shape[0], self._agiasi_tile):
        piece = flat[start : start + self._agiasi_tile]
        if grad:
            outs.append(checkpoint(self._agiasi_forward, piece, use_reentrant=False))
        else:
            outs.append(self._agiasi_forward(piece))
    out = torch.cat(outs)
    return out.view(*x.shape[:-1], out.shape[-1])


def enable_tiled_mlp(decoder: nn.Module, tile: int = DEFAULT_TILE) -> int:
    """Tile every decoder layer's ``mlp`` at ``tile`` positions; returns how many were tiled."""
    if tile < 1:
        raise ValueError("tile must be at least 1 token")
    n = 0
    # architectures outside the table may name their layers otherwise (GPT-2: ``h``): untiled
    for layer in getattr(decoder, "layers", None) or []:
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        if not hasattr(mlp, "_agiasi_forward"):
            mlp._agiasi_forward = mlp.forward
            mlp.forward = types.MethodType(_tiled_forward, mlp)
        mlp._agiasi_tile = int(tile)
        n += 1
    return n
