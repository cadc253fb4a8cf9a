"""The chunked training loss alone: memory over the live inputs and time, fused (a frozen
head's gradient computed with the loss) against checkpointed (logits recomputed in the
backward), at Phi-3.5-mini's head (3072 → 32,064, bf16) and the benchmark rows' token counts.

    python bench/loss_memory.py [--tokens 511,4095] [--chunk 1024] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def measure(path: str, tokens: int, chunk: int, device: str, hidden: int, vocab: int) -> dict:
    import torch
    from torch import nn

    from agiasi.model.losses import chunked_causal_lm_loss

    torch.manual_seed(0)
    dt = torch.bfloat16
    head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dt).requires_grad_(False)
    h = torch.randn(1, tokens + 1, hidden, device=device, dtype=dt, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens + 1))
    fn = head if path == "fused" else partial(nn.Linear.forward, head)  # not fusable
    cuda = device.startswith("cuda")
    times = []
    for i in range(6):
        h.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        chunked_causal_lm_loss(h, fn, labels, chunk).backward()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    out = {"path": path, "tokens": tokens, "chunk": chunk, "ms": 1e3 * statistics.median(times)}
    if cuda:
        out["peak_over_inputs_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="511,4095")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [
        measure(p, int(t), args.chunk, args.device, args.hidden, args.vocab)
        for t in args.tokens.split(",")
        for p in ("checkpointed", "fused")
    ]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
