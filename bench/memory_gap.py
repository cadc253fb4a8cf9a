"""Why the allocator reserves more than the step allocates, and how much memory a step needs.

One implementation of bench/train.py, its rows one after another on one loaded model (the
compiler reset between rows, as the rows' own run does). For each row:

- the peaks over the untimed steps (compilation, the optimizer's first step) and over two
  steady steps;
- PyTorch's allocator trace over the steady steps replayed to the moment of peak reserved
  memory: what is live, what waits on another stream, and the allocations that made the
  allocator map more memory instead of reusing its cache;
- the cached layout after a step: the free ranges and the long-lived blocks between them;
- ``fits_in``: the smallest cap (``set_per_process_memory_fraction``, 32 MiB steps down from
  the steady reserved peak) under which two more steps run. Under a cap the allocator gives
  cached blocks back and retries before it fails, so this, not the reserved peak of an uncapped
  run, is the memory a card must have.

    python bench/memory_gap.py --impl so8co-d0 --rows 512x8,4096x1 [--shape llama-phi-dims]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import LIMIT_GIB, SHAPES, build, cap_memory, make_random_model, make_step  # noqa: E402

GIB, MIB = 2**30, 2**20


def _where(frames) -> str:
    """The innermost frame of ours or of the model's code, else the innermost at all."""
    for f in frames or []:
        name = f.get("filename", "")
        if any(k in name for k in ("agiasi", "modeling_", "bench/", "peft", "unsloth")):
            return f"{Path(name).name}:{f.get('line')} {f.get('name')}"
    f = (frames or [{}])[0]
    return f"{Path(f.get('filename', '?')).name}:{f.get('line')} {f.get('name', '?')}"


def replay(trace: list[dict], reserved: int = 0, allocated: int = 0) -> dict:
    """Reserved and allocated over the trace, from the bytes each held when recording began;
    the live blocks at the reserved peak (those allocated since), and the allocations that
    followed each growth of reserved memory (what the cache could not serve)."""
    pending = 0
    live: dict[int, dict] = {}
    waiting: dict[int, int] = {}
    per_stream = collections.Counter()
    growths: list[dict] = []
    grew = None
    best = {"reserved": -1}
    for ev in trace:
        a, size = ev["action"], ev["size"]
        if a in ("segment_map", "segment_alloc"):
            reserved += size
            per_stream[ev.get("stream", 0)] += size
            grew = size
        elif a in ("segment_unmap", "segment_free"):
            reserved -= size
            per_stream[ev.get("stream", 0)] -= size
        elif a == "alloc":
            allocated += size
            live[ev["addr"]] = ev
            if grew is not None:
                growths.append(
                    {
                        "mapped_mib": round(grew / MIB, 1),
                        "for_mib": round(size / MIB, 1),
                        "allocated_gib": round(allocated / GIB, 3),
                        "reserved_gib": round(reserved / GIB, 3),
                        "pending_mib": round(pending / MIB, 1),
                        "stream": ev.get("stream", 0),
                        "where": _where(ev.get("frames")),
                    }
                )
                grew = None
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
                "reserved": reserved / GIB,
                "allocated": allocated / GIB,
                "pending_free": pending / GIB,
                "per_stream_gib": {str(k): v / GIB for k, v in per_stream.items()},
                "largest_live": [
                    (round(e["size"] / MIB, 1), e.get("stream", 0), _where(e.get("frames")))
                    for e in big
                ],
            }
    best["growths"] = growths[-16:]
    best["n_growths"] = len(growths)
    return best


def layout(segments: list[dict]) -> list[dict]:
    """Each large segment as runs of free (inactive) and used blocks, used runs named by their
    largest block: where long-lived blocks split the cache into pieces."""
    out = []
    for seg in segments:
        if seg.get("segment_type") != "large":
            continue
        runs: list[dict] = []
        for b in seg["blocks"]:
            used = b["state"] != "inactive"
            if runs and runs[-1]["used"] == used:
                r = runs[-1]
            else:
                r = {"used": used, "mib": 0.0, "n": 0, "largest": (0, "")}
                runs.append(r)
            r["mib"] += b["size"] / MIB
            r["n"] += 1
            if used and b["size"] > r["largest"][0]:
                r["largest"] = (b["size"], _where(b.get("frames")))
        out.append(
            {
                "stream": seg.get("stream", 0),
                "total_mib": round(seg["total_size"] / MIB, 1),
                "allocated_mib": round(seg["allocated_size"] / MIB, 1),
                "runs": [
                    {
                        "used": r["used"],
                        "mib": round(r["mib"], 1),
                        "n": r["n"],
                        **(
                            {"largest": [round(r["largest"][0] / MIB, 1), r["largest"][1]]}
                            if r["used"]
                            else {}
                        ),
                    }
                    for r in runs
                    if r["mib"] >= 1
                ],
            }
        )
    return out


def fits_in(step, ids, start_gib: float, floor_gib: float, stride_gib: float = 1 / 32) -> dict:
    """The smallest cap, from ``start_gib`` down by ``stride_gib``, under which two steps run."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    ok, failed = None, None
    cap = start_gib
    while cap >= floor_gib:
        torch.cuda.set_per_process_memory_fraction(cap * GIB / total)
        torch.cuda.empty_cache()
        try:
            for _ in range(2):
                step(ids)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            failed = cap
        if failed is not None:
            break
        ok = cap
        cap -= stride_gib
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(LIMIT_GIB * GIB / total)
    return {"fits_in_gib": ok, "fails_at_gib": failed}


def one_row(step, seq: int, batch: int, warmup: int) -> dict:
    import torch

    torch._dynamo.reset()  # a row is a run of one shape (bench/train.py's run_rows says why)
    ids = torch.randint(0, 32000, (batch, seq)).cuda()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step(ids)
    torch.cuda.synchronize()
    res = {
        "row": f"{seq}x{batch}",
        "warmup_peak_reserved": torch.cuda.max_memory_reserved() / GIB,
        "warmup_peak_allocated": torch.cuda.max_memory_allocated() / GIB,
    }
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    entries = 400_000
    torch.cuda.memory._record_memory_history(max_entries=entries, stacks="python")
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
        # a full ring buffer has lost its first events, and with them the baseline
        trace=replay(snap["device_traces"][0], *before)
        if len(snap["device_traces"][0]) < entries
        else "trace ring buffer full: not replayed",
        layout_after_step=layout(snap["segments"]),
    )
    del snap
    res.update(
        fits_in(
            step,
            ids,
            start_gib=res["steady_peak_reserved"],
            floor_gib=res["steady_peak_allocated"] - 0.25,
        )
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="so8co-d0")
    ap.add_argument("--rows", default="512x8,4096x1")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shape", default="phi-3.5-mini", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.impl == "unsloth":
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import unsloth  # noqa: F401  (before transformers, as it asks)
    rows = [tuple(int(v) for v in r.split("x")) for r in args.rows.split(",")]
    model_dir = Path(SHAPES[args.shape])
    make_random_model(model_dir, args.shape)
    cap_memory()
    step, _ = make_step(*build(args.impl, model_dir, max(s for s, _ in rows)))
    results = []
    for seq, batch in rows:
        res = {"impl": args.impl, "shape": args.shape, **one_row(step, seq, batch, args.warmup)}
        print(json.dumps(res, indent=1), flush=True)
        results.append(res)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
