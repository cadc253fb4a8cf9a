"""The export's streaming fold and NF4 round trip against their reference forms: the fold of an
``so8`` (block-diagonal) rotation computed block by block equals :func:`agiasi.soul.fold_into`'s
dense float64 product, for both mixes; a rotation with anything off its blocks takes the dense
path; the round trip equals bitsandbytes' quantize → dequantize bit for bit."""

from __future__ import annotations

import pytest
import torch

from agiasi.export.merge import _diagonal_blocks, fold_head, nf4_roundtrip
from agiasi.soul import Soul, SoulConfig, fold_into, gate_of


def _so8(h: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    soul = Soul(SoulConfig(hidden_size=h))
    with torch.no_grad():
        for p in soul.rotation.parameters():
            p.normal_(0, 0.3)
    return soul.rotation_matrix(torch.float64)


@pytest.mark.parametrize("mix", ["convex", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_fold_equals_the_dense_fold(mix, dtype):
    r = _so8(64)
    assert _diagonal_blocks(r, 8) is not None
    head = torch.randn(300, 64).to(dtype)
    got = fold_head(head, r, 1.3, mix, dtype)
    want = fold_into(head, r, gate_of(1.3), mix)
    # float64 sums of the same 8 terms in another order, then one cast: within one float64 ulp
    # of each other before the cast, so equal after it except on an exact rounding boundary
    exact = (got == want).float().mean().item()
    assert exact > 0.999
    assert torch.allclose(
        got.double(), want.double(), rtol=0, atol=float(torch.finfo(dtype).eps) * 8
    )


def test_a_dense_rotation_takes_the_dense_path():
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    assert _diagonal_blocks(q, 8) is None
    head = torch.randn(50, 64)
    assert torch.equal(fold_head(head, q, 0.7, "convex", torch.float32),
                       fold_into(head, q, gate_of(0.7), "convex"))  # fmt: skip


def test_nf4_roundtrip_is_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(256, 512).to(torch.bfloat16)
    q, state = bnbf.quantize_4bit(
        w.float(), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    assert torch.equal(nf4_roundtrip(w), bnbf.dequantize_4bit(q, state).to(torch.bfloat16))


def test_nf4_roundtrip_counts_ties_and_chunk_edges_as_bitsandbytes_does():
    """The CPU path counts bounds below each weight instead of bitsandbytes' bucketize: a
    weight exactly on a bound (and one float either side), an all-zero block, blocks far
    apart in scale, and more blocks than one chunk must all land on bitsandbytes' codes."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, _ = _get_4bit_quantize_bounds("nf4", torch.device("cpu"))
    ties = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)),
                      torch.nextafter(bounds, torch.tensor(-2.0))])  # fmt: skip
    w = torch.randn(9000, 64) * torch.logspace(-6, 2, 9000)[:, None]
    w[0] = torch.cat([torch.tensor([1.0, -1.0]), ties, torch.zeros(64 - 2 - ties.numel())])
    w[1] = 0.0
    w[2] = -w[0] * 3.5
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(nf4_roundtrip(w), bnbf.dequantize_4bit(q, state))


def test_nf4_roundtrip_sums_as_many_threads_as_the_load_did():
    """The export shares the cores out between its threads; the NF4 offset (a float32 mean
    whose rounding depends on the thread count) must still be summed as when the model was
    quantized at load, or a few weights come back one bfloat16 step off."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    n = torch.get_num_threads()
    if n < 2:
        pytest.skip("one thread: nothing to share out")
    g = torch.Generator().manual_seed(0)  # its mean differs by 4e-9 between 1 and 2 threads
    w = (torch.randn(3072, 8192, generator=g) * 0.02).to(torch.bfloat16)
    q, state = bnbf.quantize_4bit(w.float(), blocksize=64, quant_type="nf4",
                                  compress_statistics=True)  # fmt: skip
    want = bnbf.dequantize_4bit(q, state).to(torch.bfloat16)
    torch.set_num_threads(1)
    try:
        got = nf4_roundtrip(w)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(got, want)
