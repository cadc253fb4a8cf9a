"""The training loss: causal-LM cross-entropy (shifted, padding ignored), computed whole or in
chunks of positions (a frozen head's gradient computed with each chunk, any other head's chunk
checkpointed) so the (T × vocab) fp32 logits never exist at once; Gemma-2's final soft-cap
applied as HF applies it after the head; and the per-sequence log-probabilities of the
answer tokens that the preference objectives (DPO, ORPO) score, by the same chunking.
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


class _LinearCrossEntropy(torch.autograd.Function):
    """``scale · Σ CE(h Wᵀ + b, y)`` over one chunk, its gradient for ``h`` computed in the
    forward pass: ``(softmax − onehot) · scale`` in fp32, cast to ``h``'s dtype, ``@ W``.

    Why by hand: with a frozen head the backward needs nothing but that (chunk × hidden)
    gradient, so nothing of the (chunk × vocab) logits outlives the chunk and the head's matmul
    is not recomputed. Checkpointing the chunk instead keeps logits, their fp32 copy, the
    log-softmax and its gradient at once in the backward (402 vs 270 MiB at 4,095 tokens of
    Phi-3.5-mini's head, bench/loss_memory.py) and runs the head three times, not two. The
    rounding is the checkpointed path's: the fp32 gradient is scaled before its cast, as
    autograd scales it there. (Liger's and
    cut-cross-entropy's fused losses do this in Triton, CUDA only; this runs on every device.)
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, scale, grad: bool):
        logits = F.linear(h, weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        valid = y != -100
        target = y.clamp_min(0).unsqueeze(1)
        loss = ((lse - logits.gather(1, target).squeeze(1)) * valid).sum() * scale
        if grad:  # needs_input_grad says True under no_grad too: the caller knows
            p = logits.sub_(lse.unsqueeze(1)).exp_()  # the softmax, in the logits' memory
            p.scatter_add_(1, target, -valid.unsqueeze(1).to(p.dtype))
            p.mul_((valid.to(p.dtype) * scale).unsqueeze(1))
            ctx.save_for_backward(p.to(h.dtype) @ weight.to(h.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None, None, None


def _fusable_head(head) -> bool:
    """A plain linear head whose parameters are frozen (what LoRA training has): its loss can
    take :class:`_LinearCrossEntropy`; anything else (a softcap, a trained head) is checkpointed."""
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


def chunked_causal_lm_loss(
    h: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``head(h)`` without materialising the whole logits tensor.

    A frozen linear head (LoRA training) takes :class:`_LinearCrossEntropy`: each chunk's
    gradient is computed with its loss and only that is kept. Any other head is checkpointed:
    each chunk's logits are recomputed in the backward pass, so peak memory holds one chunk of
    (chunk × vocab) fp32 logits instead of the whole sequence's.
    Counting and skipping use ``labels`` where they are (the CPU in training): no host sync.
    """
    from torch.utils.checkpoint import checkpoint

    y = labels[:, 1:].reshape(-1)
    hs = h[:, :-1, :].reshape(-1, h.shape[-1])
    valid = y != -100
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise AgiasiError("the batch has no token to predict (all labels masked or length 1)")
    fused = _fusable_head(head)
    grad = torch.is_grad_enabled() and h.requires_grad  # validation computes no gradient
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, hs.shape[0], chunk):
        if not valid[start : start + chunk].any():
            continue
        yc = y[start : start + chunk].to(h.device, non_blocking=True)
        hc = hs[start : start + chunk]
        if fused:
            total = total + _LinearCrossEntropy.apply(
                hc, head.weight, head.bias, yc, 1 / n_valid, grad
            )
        else:
            total = total + checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False) / n_valid
    return total


class _LinearTokenLogp(torch.autograd.Function):
    """Per-token ``log p(y | h) = (h Wᵀ + b)[y] − logsumexp(h Wᵀ + b)`` over one chunk, its
    gradient for ``h`` computed in the forward pass: ``(onehot − softmax) @ W`` per token.

    Why by hand, as :class:`_LinearCrossEntropy`: a preference loss weighs each *sequence's*
    log-probability by a factor known only after every sequence of the batch is scored, so the
    gradient cannot be scaled in the forward pass; but ``log p_t`` depends on ``h_t`` alone, so
    the (chunk × hidden) gradient of each token is kept and the backward multiplies it by that
    token's incoming factor. Nothing of the (chunk × vocab) logits outlives the chunk.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, grad: bool):
        logits = F.linear(h, weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        valid = y != -100
        target = y.clamp_min(0).unsqueeze(1)
        logp = (logits.gather(1, target).squeeze(1) - lse) * valid
        if grad:
            p = logits.sub_(lse.unsqueeze(1)).exp_().neg_()  # −softmax, in the logits' memory
            p.scatter_add_(1, target, valid.unsqueeze(1).to(p.dtype))
            p.mul_(valid.to(p.dtype).unsqueeze(1))
            ctx.save_for_backward(p.to(h.dtype) @ weight.to(h.dtype))
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_logp.to(grad_h.dtype).unsqueeze(1), None, None, None, None


def _chunk_token_logp(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    logp = logits.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)
    return logp * (y != -100)


def sequence_logps(
    h: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of ``log p`` of every labelled next token (fp32, shape (B,)) and how
    many there are (on ``labels``' device), the head run ``chunk`` positions at a time as in
    :func:`chunked_causal_lm_loss`. A row with no labelled token is an error: its answer is
    gone."""
    from torch.utils.checkpoint import checkpoint

    b, t = labels.shape
    y = labels[:, 1:].reshape(-1)
    valid = y != -100
    counts = valid.reshape(b, t - 1).sum(1)
    if t < 2 or bool((counts == 0).any()):
        raise AgiasiError("a sequence of the batch has no answer token to score")
    hs = h[:, :-1, :].reshape(-1, h.shape[-1])
    fused = _fusable_head(head)
    grad = torch.is_grad_enabled() and h.requires_grad
    pieces = []
    for start in range(0, hs.shape[0], chunk):
        yc = y[start : start + chunk].to(h.device, non_blocking=True)
        hc = hs[start : start + chunk]
        if not valid[start : start + chunk].any():
            pieces.append(hc.new_zeros(hc.shape[0], dtype=torch.float32))
        elif fused:
            pieces.append(_LinearTokenLogp.apply(hc, head.weight, head.bias, yc, grad))
        else:
            pieces.append(checkpoint(_chunk_token_logp, head, hc, yc, use_reentrant=False))
    return torch.cat(pieces).reshape(b, t - 1).sum(1), counts
