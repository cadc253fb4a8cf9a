"""Offloaded checkpointing's bookkeeping: gradients equal to no checkpointing, the stack of
offloaded inputs empties in the backward, and a forward with no backward leaves nothing."""

import gc
from functools import partial

import pytest
import torch

from agiasi.errors import AgiasiError
from agiasi.model.offload import (
    _Offloader,
    available_host_memory,
    check_host_memory,
    offloaded_checkpoint,
)


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


def test_host_memory_check_counts_every_layer_input():
    # Phi-3.5-mini at 32k tokens in bf16: 3072 × 32 layers × 32768 × 2 bytes = 6 GiB exactly
    msg = check_host_memory(3072, 32, 32768, 2, available=16 * 2**30)
    assert "6.00 GiB" in msg and "16.00 GiB available" in msg
    with pytest.raises(AgiasiError, match=r"6\.00 GiB of layer inputs.*only 7\.00 GiB is"):
        check_host_memory(3072, 32, 32768, 2, available=7 * 2**30)  # 6 > 0.8 × 7
    assert available_host_memory() is None or available_host_memory() > 0


def test_train_refuses_offload_beyond_host_memory(tiny_phi3_tok, tmp_path, monkeypatch, capsys):
    from agiasi.cli import main
    from agiasi.model import offload

    monkeypatch.setattr(offload, "available_host_memory", lambda: 2**14)  # 16 KiB left
    run = tmp_path / "run"
    rc = main(["train", "--base-model", str(tiny_phi3_tok), "--output-dir", str(run),
               "--max-steps", "2", "--max-length", "64", "--quantization", "none",
               "--gradient-checkpointing", "--offload-activations", "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    # 64 hidden × 2 layers × 64 tokens × 4 bytes (float32 on the CPU) = 32 KiB
    assert "would keep 0.03 MiB" in err and "only 0.02 MiB is available" in err
    assert "Traceback" not in err
    assert (
        "--offload-activations would keep" in err and "(64 tokens a micro-batch × 2 layers" in err
    )
    assert not run.exists() or not any(run.glob("step_*"))


def test_the_recompute_runs_under_the_forwards_autocast():
    """The backward recomputes a layer in autograd's thread, where no autocast is on: it must
    run the layer under the forward's autocast, or its bf16 graph would be recomputed in
    float32 and the gradients would be those of another function."""
    layers = _layers()
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _run(layers, x)
    loss.backward()
    want = [p.grad.clone() for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    off = _Offloader()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _run(layers, x, partial(offloaded_checkpoint, offloader=off))
    loss.backward()
    got = [p.grad for layer in layers for p in layer.parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first layer, by design
def test_the_first_layer_computes_no_gradient_for_its_input():
    """The first layer's input (a frozen embedding's rows) needs no gradient: its recompute
    must not compute one (a layer's worth of input-side matmuls a step), and every parameter's
    gradient stays the plain run's (the test above). The layers after it still pass theirs on."""
    layers = _layers()
    seen = []
    for layer in layers:
        layer[0].register_full_backward_hook(
            lambda module, grad_in, grad_out: seen.append(grad_in[0] is not None)
        )
    off = _Offloader()
    _run(layers, torch.randn(3, 8), partial(offloaded_checkpoint, offloader=off)).backward()
    assert seen == [True, True, True, False]  # the backward runs from the last layer down
    seen.clear()
    _run(layers, torch.randn(3, 8)).backward()  # autograd's own rule, for comparison
    assert seen == [True, True, True, False]
