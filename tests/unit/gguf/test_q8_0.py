"""Q8_0 written by torch (agiasi.gguf.writer.q8_0_bytes) is byte for byte gguf-py's numpy Q8_0,
which gguf-py keeps bit-exact with ggml-quants.c's reference: on random rows of several scales,
on values at exactly .5 after scaling (roundf's ties away from zero), negative zeros, all-zero
blocks, subnormals and the largest finite floats."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from agiasi.gguf.writer import q8_0_bytes


def _reference(t: torch.Tensor) -> np.ndarray:
    return gguf.quants.quantize(t.to(torch.float32).numpy(), gguf.GGMLQuantizationType.Q8_0)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 7.5, 3e4])
def test_random_rows_equal_gguf_py(scale):
    g = torch.Generator().manual_seed(int(scale * 1e3) % 1000)
    t = torch.randn(64, 256, generator=g) * scale
    assert np.array_equal(q8_0_bytes(t), _reference(t))


def test_ties_zeros_and_extremes_equal_gguf_py():
    rows = []
    # every k + 0.5 after scaling: max 127 in the block makes d = 1 exactly
    ties = torch.tensor([127.0] + [k + 0.5 for k in range(-63, 62, 4)][:31])
    rows.append(ties)
    rows.append(-ties)
    rows.append(torch.zeros(32))
    rows.append(torch.tensor([-0.0] * 16 + [0.0] * 16))
    rows.append(torch.full((32,), 1e-45))  # subnormal
    rows.append(torch.tensor([3.4e38, -3.4e38] * 16))
    rows.append(torch.tensor([1.0] + [0.49999997] * 31) * 127)  # just under a tie
    t = torch.stack([r.to(torch.float32) for r in rows])
    kept = t.clone()
    assert np.array_equal(q8_0_bytes(t), _reference(t))
    assert torch.equal(t, kept)  # a float32 tensor is quantized, not overwritten


def test_bf16_input_quantizes_its_float32_values():
    t = torch.randn(8, 64).to(torch.bfloat16)
    assert np.array_equal(q8_0_bytes(t), _reference(t.float()))
