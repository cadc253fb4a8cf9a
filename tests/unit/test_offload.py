"""Offloaded checkpointing's bookkeeping: gradients equal to no checkpointing, the stack of
offloaded inputs empties in the backward, and a forward with no backward leaves nothing."""

import gc
from functools import partial

import torch

from agiasi.offload import _Offloader, offloaded_checkpoint


def _layers(n=4, width=8):
    torch.manual_seed(0)
    return [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()) for _ in range(n)]


def _run(layers, x, func=None):
    h = x
    for layer in layers:
        h = func(layer, h) if func else layer(h)
    return h.square().sum()


def test_offloaded_gradients_equal_plain_and_the_stack_empties():
    layers = _layers()
    x = torch.randn(3, 8)
    _run(layers, x).backward()
    want = [p.grad.clone() for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    off = _Offloader()
    loss = _run(layers, x, partial(offloaded_checkpoint, offloader=off))
    assert len(off.stack) == len(layers)  # one host copy per layer input
    loss.backward()
    assert off.stack == []
    got = [p.grad for layer in layers for p in layer.parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_a_forward_without_backward_leaves_nothing():
    layers = _layers()
    off = _Offloader()
    func = partial(offloaded_checkpoint, offloader=off)
    loss = _run(layers, torch.randn(3, 8), func)
    del loss  # e.g. a step skipped after a NaN loss: the graph goes, its host copies with it
    gc.collect()
    assert all(r() is None for r in off.stack)
    loss = _run(layers, torch.randn(3, 8), func)
    loss.backward()  # the stale entries below are dropped, the new ones taken
    assert off.stack == []
    with torch.no_grad():
        _run(layers, torch.randn(3, 8), func)
    assert off.stack == []  # no backward will come: nothing kept
