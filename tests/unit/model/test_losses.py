"""The chunked training loss: a frozen linear head's fused path (gradient computed with the
loss) against the checkpointed path and against the definition, in fp32 and bf16."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from agiasi.model.losses import _fusable_head, causal_lm_loss, chunked_causal_lm_loss


def _case(dtype, vocab=97, hidden=24, shape=(3, 19), bias=False):
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=bias).to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.3)
    h = (torch.randn(*shape, hidden, generator=g) * 2).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[-1, 4:9] = -100  # a masked span inside a chunk
    if shape[0] > 2:
        labels[1, :] = -100  # a whole row masked: chunks without a target are skipped
    return h, head, labels


def _checkpointed(head):
    """The same head as a callable the fused path does not take (as a softcap wrapper is)."""
    return partial(nn.Linear.forward, head)


def test_only_a_frozen_plain_linear_head_is_fused():
    h, head, _ = _case(torch.float32)
    assert _fusable_head(head)
    assert not _fusable_head(_checkpointed(head))
    head.weight.requires_grad_(True)
    assert not _fusable_head(head)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_and_gradient_equal_the_full_logits_in_float32(bias):
    h, head, labels = _case(torch.float32, bias=bias)
    full = causal_lm_loss(head(h), labels)
    (g_full,) = torch.autograd.grad(full, h)
    for chunk in (4, 7, 64):
        fused = chunked_causal_lm_loss(h, head, labels, chunk)
        (g_fused,) = torch.autograd.grad(fused, h)
        assert fused.item() == pytest.approx(full.item(), rel=1e-6)
        # softmax − onehot in fp32 each way: the sums differ in order only
        assert torch.allclose(g_fused, g_full, rtol=1e-5, atol=1e-6 * g_full.abs().max().item())
    # the last position predicts nothing: its gradient is exactly zero
    assert g_fused[:, -1].abs().max().item() == 0.0


def test_fused_gradient_in_bfloat16_is_the_checkpointed_one_within_its_rounding():
    """Both paths cast (softmax − onehot)/n from fp32 to bf16 and multiply by W: an element of
    that fp32 gradient may round to a neighbouring bf16 value (the fp32 ops run in another
    order), so the bound is one bf16 ulp of each term, Σ_v eps·|p_v|·|W_v|, plus the final
    rounding of the product."""
    h, head, labels = _case(torch.bfloat16, vocab=211, hidden=40, shape=(2, 33))
    ref = chunked_causal_lm_loss(h, _checkpointed(head), labels, 8)
    (g_ref,) = torch.autograd.grad(ref * 0.25, h)
    fused = chunked_causal_lm_loss(h, head, labels, 8)
    (g_fused,) = torch.autograd.grad(fused * 0.25, h)  # a scaled loss (gradient accumulation)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)

    eps = torch.finfo(torch.bfloat16).eps
    w = head.weight.float()
    y = labels[:, 1:].reshape(-1)
    p = torch.softmax(h[:, :-1].reshape(-1, w.shape[1]).float().detach() @ w.T, -1)
    p = (p - nn.functional.one_hot(y.clamp_min(0), w.shape[0])).abs() * (y != -100)[:, None]
    p = p * 0.25 / int((y != -100).sum())
    bound = 2 * eps * (p @ w.abs()) + eps * g_ref[:, :-1].float().abs().reshape(p.shape[0], -1)
    diff = (g_fused[:, :-1] - g_ref[:, :-1]).float().abs().reshape(p.shape[0], -1)
    assert (diff <= bound + 1e-30).all()
    assert g_fused.dtype == torch.bfloat16


def test_a_chunk_of_the_fused_loss_keeps_no_logits_for_the_backward():
    """What autograd holds after the forward is the (tokens × hidden) gradient, not a
    (chunk × vocab) tensor: the memory the fused path exists for."""
    h, head, labels = _case(torch.float32, vocab=500, hidden=16, shape=(1, 41))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_causal_lm_loss(h, head, labels, 8)
    assert sizes and max(sizes) <= 8 * 16  # one chunk's gradient for h, never 8 × 500 logits
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_causal_lm_loss(h, _checkpointed(head), labels, 8)
    assert max(sizes) <= 8 * 16  # the checkpointed path saves inputs only (it recomputes)


def test_without_autograd_the_fused_loss_runs_the_head_only():
    """Validation runs under no_grad: one matmul a chunk (the head), not a second one for a
    gradient nobody asked for; with autograd, two (the head and the gradient for h)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.n += 1
            return func(*args, **(kwargs or {}))

    h, head, labels = _case(torch.float32, shape=(1, 33))
    for grad_mode, per_chunk in ((False, 1), (True, 2)):
        with torch.set_grad_enabled(grad_mode), CountMatmuls() as count:
            loss = chunked_causal_lm_loss(h, head, labels, 8)
        assert count.n == per_chunk * 4  # 32 positions predict: 4 chunks of 8
        assert loss.requires_grad is grad_mode


# --------------------------------------------------------------------------- per-sequence log-probs


def _logps_by_definition(h, head, labels):
    """Σ log softmax(W h_t)[y_{t+1}] per row, over labelled positions (autograd all the way)."""
    logp = torch.log_softmax(head(h).float(), -1)[:, :-1]
    y = labels[:, 1:]
    picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (y != -100)
    return picked.sum(1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed"])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_sequence_logps_and_their_gradient_equal_the_definition(fused, chunk):
    """Each row's log-prob and the gradient of any per-row weighting of them (what DPO's loss
    is) equal autograd through the full logits; fp32, so to a few float32 ulps of the sums."""
    from agiasi.model.losses import sequence_logps

    h, head, labels = _case(torch.float32, shape=(4, 23))
    labels[1, 3:] = 7  # every row keeps labelled tokens
    weights = torch.tensor([0.5, -1.5, 2.0, 0.25], dtype=torch.float64)
    fn = head if fused else _checkpointed(head)
    got, counts = sequence_logps(h, fn, labels, chunk)
    (got.double() * weights).sum().backward()
    g_got = h.grad.clone()
    h.grad = None
    want = _logps_by_definition(h, head, labels)
    (want.double() * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_got, h.grad, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == (labels[:, 1:] != -100).sum(1).tolist()


def test_sequence_logps_refuses_a_row_without_an_answer_token():
    from agiasi.errors import AgiasiError
    from agiasi.model.losses import sequence_logps

    h, head, labels = _case(torch.float32, shape=(3, 19))  # row 1 is fully masked
    with pytest.raises(AgiasiError, match="no answer token"):
        sequence_logps(h, head, labels)
