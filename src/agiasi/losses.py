"""The training loss: causal-LM cross-entropy (shifted, padding ignored), computed whole or in
chunks of positions under activation checkpointing so the (T × vocab) fp32 logits never exist
at once; Gemma-2's final soft-cap applied as HF applies it after the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agiasi.errors import AgiasiError


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (in fp32)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    if not (shift_labels != -100).any():
        raise AgiasiError("the batch has no token to predict (all labels masked or length 1)")
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
    )


def softcapped_logits(head, cap: float, h: torch.Tensor) -> torch.Tensor:
    """Gemma-2's final-logit soft-capping, ``cap · tanh(W h / cap)``: after the head, so the
    soul (before the head) still folds exactly."""
    return cap * torch.tanh(head(h) / cap)


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(
    h: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``head(h)`` without materialising the whole logits tensor.

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so peak
    memory holds one chunk of (chunk × vocab) fp32 logits instead of the whole sequence's.
    Counting and skipping use ``labels`` where they are (the CPU in training): no host sync.
    """
    from torch.utils.checkpoint import checkpoint

    y = labels[:, 1:].reshape(-1)
    hs = h[:, :-1, :].reshape(-1, h.shape[-1])
    valid = y != -100
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise AgiasiError("the batch has no token to predict (all labels masked or length 1)")
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, hs.shape[0], chunk):
        if not valid[start : start + chunk].any():
            continue
        yc = y[start : start + chunk].to(h.device, non_blocking=True)
        total = total + checkpoint(
            _chunk_ce, head, hs[start : start + chunk], yc, use_reentrant=False
        )
    return total / n_valid
