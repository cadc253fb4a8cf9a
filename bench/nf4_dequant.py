"""The NF4 dequantization kernel alone: agiasi.model.nf4's compiled expression against bitsandbytes'
CUDA kernel, on the four linears of a Phi-3.5-mini layer, with the card's copy bandwidth as the
ceiling (the kernel reads 0.5 byte and writes 2 bytes a weight: it is bound by memory).

    python bench/nf4_dequant.py            # on a CUDA machine; prints a table, --out FILE json

Rows: ``bnb`` (bitsandbytes.functional.dequantize_4bit), ``stack`` (the expression before
session 11: one output element at a time, the two nibbles joined by ``stack``), ``pairs``
(agiasi.model.nf4.dequantize today: two bf16 a byte, stored as one int32), ``quads`` (four a 16-bit
load, stored as one int64; a candidate). Each compiled as the training step compiles it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from agiasi.model.nf4 import block_scales, dequantize  # noqa: E402

SHAPES = {  # Phi-3.5-mini's NF4 linears (N × K)
    "qkv_proj": (9216, 3072),
    "o_proj": (3072, 3072),
    "gate_up_proj": (16384, 3072),
    "down_proj": (3072, 8192),
}


def stack(packed, absmax, code2, absmax2, offset, code, shape, blocksize, dtype):
    p = packed.reshape(-1)
    q = torch.stack((p >> 4, p & 15), dim=-1).reshape(-1).long()
    w = code[q].reshape(-1, blocksize) * block_scales(absmax, code2, absmax2, offset)
    return w.reshape(shape).to(dtype)


def quads(packed, absmax, code2, absmax2, offset, code, shape, blocksize, dtype):
    scale = block_scales(absmax, code2, absmax2, offset)
    p = packed.reshape(-1).view(torch.int16).reshape(absmax.numel(), blocksize // 4).to(torch.int32)
    out = None
    for i, shift in enumerate((4, 0, 12, 8)):  # little-endian: byte 0 is the low one
        v = (code[((p >> shift) & 15).long()] * scale).to(dtype).view(torch.int16)
        v = (v.to(torch.int64) & 0xFFFF) << (16 * i)
        out = v if out is None else out | v
    return out.view(dtype).reshape(shape)


def _time_ms(fn, sets, reps=40) -> float:
    """GPU time a call: the kernels' own time under the profiler (a compiled function's Python
    wrapper costs ~50 µs a call, more than a small linear's kernel; inside a compiled decoder
    layer there is no such wrapper, so host time is left out here)."""
    from torch.profiler import ProfilerActivity, profile

    for s in sets:
        fn(s)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            fn(sets[i % len(sets)])
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return sum(e.self_device_time_total for e in kernels) / reps / 1e3


def main() -> None:
    import bitsandbytes.functional as bnbf

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dtype = torch.bfloat16
    buf = torch.empty(2, 2**30, dtype=torch.uint8, device="cuda")
    copy_ms = _time_ms(lambda b: b[1].copy_(b[0]), [buf], reps=20)
    ceiling = 2 * 2**30 / copy_ms / 1e6  # GB/s, bytes read + written
    del buf
    impls = {
        "stack": torch.compile(stack, dynamic=False),
        "pairs": torch.compile(dequantize, dynamic=False),
        "quads": torch.compile(quads, dynamic=False),
    }
    rows = []
    for name, (n, k) in SHAPES.items():
        sets = []
        for seed in range(4):  # rotate four weights: no timing out of the L2 cache
            g = torch.Generator(device="cuda").manual_seed(seed)
            w = torch.randn(n, k, device="cuda", generator=g, dtype=dtype) * 0.02
            q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            t = (q, st.absmax, st.state2.code, st.state2.absmax, st.offset.reshape(()).float(),
                 st.code.float())  # fmt: skip
            sets.append((q, st, t))
        byte_count = n * k // 2 + sets[0][1].absmax.numel() + n * k * 2
        ref = bnbf.dequantize_4bit(sets[0][0], sets[0][1])
        times = {"bnb": _time_ms(lambda s: bnbf.dequantize_4bit(s[0], s[1]), sets)}
        for impl, fn in impls.items():
            out = fn(*sets[0][2], (n, k), 64, dtype)
            # compiled, the scale's multiply-add is fused (≤ 1 bf16 ulp, tests/gpu)
            torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)
            times[impl] = _time_ms(lambda s, fn=fn, nk=(n, k): fn(*s[2], nk, 64, dtype), sets)
        for impl, ms in times.items():
            rows.append({"linear": name, "shape": [n, k], "impl": impl, "us": ms * 1e3,
                         "gb_s": byte_count / ms / 1e6, "of_copy": byte_count / ms / 1e6 / ceiling})  # fmt: skip
    print(f"{torch.cuda.get_device_name()}: copy ceiling {ceiling:.0f} GB/s (read + write)")
    print(f"{'linear':<14}{'impl':<8}{'µs':>9}{'GB/s':>8}{'× copy':>8}")
    for r in rows:
        print(
            f"{r['linear']:<14}{r['impl']:<8}{r['us']:>9.1f}{r['gb_s']:>8.0f}{r['of_copy']:>8.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps({"ceiling_gb_s": ceiling, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
