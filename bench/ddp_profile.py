"""Where a data-parallel step's time goes: `agiasi train` under torch.profiler on every rank
(CPU + CUDA), the random Phi-3.5-mini of bench/ddp.py, seq 2048 x 1 per GPU.

Writes, per rank, the profiler's table and a Chrome trace (open in Perfetto), then prints per
step: wall time between all-reduces, GPU busy time on the compute stream, the GPU's idle gaps
longer than 1 ms and what the host was doing then (the CPU op open at the gap's start).

    python bench/ddp_profile.py --gpus 2 --steps 8 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from agiasi.cli import main

    rank = int(os.environ.get("RANK", "0"))
    train = ["train", "--base-model", str(args.base), "--max-length", str(args.seq),
             "--batch-size", "1", "--max-steps", str(args.steps), "--save-steps", "100000",
             "--warmup-steps", "2", "--annealing-steps", "4", "--lora-dropout", "0",
             "--no-progress", "--seed", "1", "--output-dir", str(args.out / "run"),
             "--overwrite", *(["--compile"] if args.compile else [])]  # fmt: skip
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        rc = main(train)
    torch.cuda.synchronize()
    (args.out / f"rank{rank}_table.txt").write_text(
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    )
    trace = args.out / f"rank{rank}_trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
        g.write(f.read())
    trace.unlink()
    if rc:
        raise SystemExit(rc)


def analyse(trace_gz: Path, skip: int = 3) -> list[dict]:
    events = json.load(gzip.open(trace_gz))["traceEvents"]
    kernels = sorted(
        (e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"]
    )
    nccl = [k for k in kernels if "nccl" in k["name"].lower()]
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    rows = []
    for a, b in zip(nccl, nccl[1:], strict=False):
        inside = [k for k in kernels if a["ts"] <= k["ts"] < b["ts"]]
        busy = sum(k["dur"] for k in inside)
        gaps = []
        for k0, k1 in zip(inside, inside[1:], strict=False):
            gap = k1["ts"] - (k0["ts"] + k0["dur"])
            if gap > 1000:
                at = k0["ts"] + k0["dur"]
                host = [c for c in cpu_ops if c["ts"] <= at < c["ts"] + c["dur"]]
                host.sort(key=lambda c: c["dur"])
                gaps.append((round(gap / 1000, 1), host[0]["name"] if host else "?"))
        rows.append(
            {"wall_ms": (b["ts"] - a["ts"]) / 1000, "busy_ms": busy / 1000, "gaps": gaps[:8]}
        )
    return rows[skip:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/tmp/agiasi_ddp_profile"))
    ap.add_argument("--base", type=Path, default=Path("/tmp/agiasi_ddp/phi35-random"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.base / "config.json").exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from train import make_random_model

        make_random_model(args.base)
        for f in (ROOT / "src/agiasi/assets/tiny-ja-phi3").glob("tokenizer*"):
            (args.base / f.name).write_bytes(f.read_bytes())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus),
           __file__, "--worker", *sys.argv[1:]]  # fmt: skip
    subprocess.run(cmd, check=True)
    for r in range(args.gpus):
        print(f"\nrank {r}: per step (wall between all-reduces, GPU busy, gaps > 1 ms: host op)")
        for row in analyse(args.out / f"rank{r}_trace.json.gz"):
            print(f"  {row['wall_ms']:7.1f} ms  busy {row['busy_ms']:7.1f}  {row['gaps']}")


if __name__ == "__main__":
    main()
