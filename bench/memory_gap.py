"""Why the allocator reserves more than the step allocates: one implementation of
bench/train.py, a few steps, then PyTorch's allocator trace over two steady steps replayed to
the moment of peak reserved memory (what is live, what waits on another stream, what is free).

    python bench/memory_gap.py --impl so8co-d0 --seq 512 --batch 8 [--shape llama-phi-dims]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import SHAPES, build, cap_memory, make_random_model, make_step  # noqa: E402

GIB = 2**30


def _where(frames) -> str:
    """The innermost frame of ours or of the model's code, else the innermost at all."""
    for f in frames or []:
        name = f.get("filename", "")
        if "agiasi" in name or "modeling_" in name or "bench/" in name or "peft" in name:
            return f"{Path(name).name}:{f.get('line')} {f.get('name')}"
    return (frames or [{}])[0].get("name", "?")


def replay(trace: list[dict]) -> dict:
    """Reserved and allocated over the trace; the live blocks at the reserved peak."""
    reserved = allocated = pending = 0
    live: dict[int, dict] = {}
    waiting: dict[int, int] = {}
    per_stream = collections.Counter()
    best = {"reserved": -1}
    for ev in trace:
        a, size = ev["action"], ev["size"]
        if a in ("segment_map", "segment_alloc"):
            reserved += size
            per_stream[ev.get("stream", 0)] += size
        elif a in ("segment_unmap", "segment_free"):
            reserved -= size
            per_stream[ev.get("stream", 0)] -= size
        elif a == "alloc":
            allocated += size
            live[ev["addr"]] = ev
        elif a == "free_requested":
            waiting[ev["addr"]] = size
            pending += size
        elif a == "free_completed":
            allocated -= size
            live.pop(ev["addr"], None)
            pending -= waiting.pop(ev["addr"], 0)
        if reserved > best["reserved"]:
            big = sorted(live.values(), key=lambda e: -e["size"])[:12]
            best = {
                "reserved": reserved,
                "allocated": allocated,
                "pending_free": pending,
                "per_stream_gib": {str(k): v / GIB for k, v in per_stream.items()},
                "largest_live": [
                    (round(e["size"] / 2**20, 1), e.get("stream", 0), _where(e.get("frames")))
                    for e in big
                ],
            }
    return best


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="so8co-d0")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shape", default="phi-3.5-mini", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.impl == "unsloth":
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import unsloth  # noqa: F401  (before transformers, as it asks)
    model_dir = Path(SHAPES[args.shape])
    make_random_model(model_dir, args.shape)
    cap_memory()
    step, _ = make_step(*build(args.impl, model_dir, args.seq))
    ids = torch.randint(0, 32000, (args.batch, args.seq)).cuda()

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step(ids)
    torch.cuda.synchronize()
    res = {
        "impl": args.impl,
        "row": f"{args.seq}x{args.batch}",
        "warmup_peak_reserved": torch.cuda.max_memory_reserved() / GIB,
        "warmup_peak_allocated": torch.cuda.max_memory_allocated() / GIB,
    }
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    for _ in range(2):
        step(ids)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    stats = torch.cuda.memory_stats()
    res.update(
        steady_peak_reserved=torch.cuda.max_memory_reserved() / GIB,
        steady_peak_allocated=torch.cuda.max_memory_allocated() / GIB,
        large_pool_reserved_peak=stats["reserved_bytes.large_pool.peak"] / GIB,
        small_pool_reserved_peak=stats["reserved_bytes.small_pool.peak"] / GIB,
        trace=replay(snap["device_traces"][0]),
    )
    for k in ("reserved", "allocated", "pending_free"):
        res["trace"][k] = res["trace"][k] / GIB
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
