"""GPU tier (skipped without CUDA): the NF4 path on a real card, first step finite from identity
init (the NaN the design note hit on the GPU), offloaded checkpointing equal to the standard one."""

import pytest
import torch

from tests.helpers import make_wrapper

pytestmark = pytest.mark.gpu


def test_nf4_first_step_finite_on_cuda(tiny_phi3):
    pytest.importorskip("bitsandbytes")
    w = make_wrapper(
        tiny_phi3, quantization="nf4", dtype="auto", device="cuda", gradient_checkpointing=True
    ).train()
    ids = torch.randint(3, 128, (2, 64), device="cuda")
    out = w(ids, labels=ids, return_logits=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, p in w.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_offload_equals_standard_checkpointing_on_cuda(tiny_phi3):
    losses = []
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    for offload in (False, True):
        w = make_wrapper(
            tiny_phi3,
            device="cuda",
            gradient_checkpointing=True,
            offload_activations=offload,
            lora_dropout=0.1,
        ).train()
        torch.manual_seed(0)
        torch.cuda.manual_seed(0)
        losses.append(w(ids, labels=ids, return_logits=False).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
