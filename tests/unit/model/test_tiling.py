"""Sequence-tiled MLP: the same forward and gradients as the untiled model, and what autograd
keeps for the backward shrinks to one tile's internals."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from agiasi.model.tiling import enable_tiled_mlp
from tests.helpers import make_wrapper

# fp32, a few hundred multiply-adds per output: tiling changes only the matmuls' row counts,
# so kernels may reduce in another order — ~1e-7 of the magnitude; 1e-5 leaves a margin a
# wrong tile boundary (a position lost, doubled or shifted) exceeds by orders of magnitude.
RTOL = 1e-5


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    (out.float().pow(2).mean()).backward()
    return out.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("which", ["tiny_phi3", "tiny_llama_tied"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_equals_untiled_forward_and_gradients(which, checkpointing, request):
    path = request.getfixturevalue(which)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base.train()
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiled = copy.deepcopy(base)
    n = enable_tiled_mlp(tiled.get_decoder(), tile=7)  # 2 × 24 positions: 7 tiles, the last 6
    assert n == len(tiled.get_decoder().layers)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    want_out, want = _grads(base, ids)
    got_out, got = _grads(tiled, ids)
    scale = want_out.abs().max()
    torch.testing.assert_close(got_out, want_out, rtol=RTOL, atol=RTOL * scale)
    assert set(got) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=RTOL, atol=RTOL * g.abs().max(), msg=name)
    # the module tree and its names are untouched (LoRA keys, checkpoints)
    assert [k for k, _ in tiled.named_parameters()] == [k for k, _ in base.named_parameters()]


def test_short_batches_are_not_tiled_and_no_grad_tiles_without_checkpoints(tiny_phi3):
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32).eval()
    mlp = model.get_decoder().layers[0].mlp
    ref = copy.deepcopy(mlp)
    enable_tiled_mlp(model.get_decoder(), tile=16)
    x = torch.randn(1, 16, 64)
    with torch.no_grad():
        assert torch.equal(mlp(x), ref(x))  # 16 positions: the original forward, untouched
        y = torch.randn(3, 11, 64)
        torch.testing.assert_close(mlp(y), ref(y), rtol=RTOL, atol=RTOL * ref(y).abs().max())


def _saved_bytes(fn, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x).sum().backward()
    return total


def test_autograd_keeps_one_tiles_internals_not_the_sequences(tiny_phi3):
    """What the backward keeps for a 4096-position MLP: untiled, its intermediates (the gate_up
    output, 2I floats a position, its halves and the product — with I = 2H here, several
    inputs' worth); tiled at 256, each tile's input only (H floats a position) until the tile's
    own backward recomputes the rest."""
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    mlp = model.get_decoder().layers[0].mlp
    untiled = copy.deepcopy(mlp)
    enable_tiled_mlp(model.get_decoder(), tile=256)
    x = torch.randn(1, 4096, 64, requires_grad=True)
    full = _saved_bytes(untiled, x)
    tiled = _saved_bytes(mlp, x)
    per_position_input = 64 * 4
    assert tiled <= 4096 * per_position_input * 1.05  # the tiles' inputs, nothing more
    assert full >= 4 * tiled  # gate_up (4H), its halves and the product: ≥ 4 inputs' worth


def test_the_wrapper_trains_the_same_with_tiles_and_offloaded_checkpoints(tiny_phi3):
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    runs = {}
    for tile in (0, 16):
        torch.manual_seed(0)
        w = make_wrapper(
            tiny_phi3, gradient_checkpointing=True, offload_activations=True, mlp_tile=tile
        )
        w.train()
        loss = w(ids, labels=ids, return_logits=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in w.named_parameters() if p.grad is not None}
        runs[tile] = (float(loss), grads)
    (l0, g0), (l1, g1) = runs[0], runs[16]
    assert l1 == pytest.approx(l0, rel=RTOL)
    assert set(g0) == set(g1) and any("lora_" in n for n in g0)
    for n, g in g0.items():
        torch.testing.assert_close(g1[n], g, rtol=RTOL, atol=RTOL * g.abs().max(), msg=n)


def test_a_decoder_without_layers_is_left_alone():
    from torch import nn

    assert enable_tiled_mlp(nn.Module(), tile=16) == 0
