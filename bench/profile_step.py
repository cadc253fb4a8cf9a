"""Where a training step's time goes: torch.profiler over 3 steps of one implementation.

python bench/profile_step.py --impl nosoul --seq 512 --batch 1 [--shape llama-phi-dims]

Any of bench/train.py's implementation names, unsloth and so8co-d0 included; the random model
of the shape is made first if bench/train.py has not made it. Wall time per step (5 steps, no
profiler) beside the GPU's busy time says whether the step is launch-bound.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import SHAPES, build, make_random_model, make_step  # noqa: E402


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="nosoul")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--shape", default="phi-3.5-mini", choices=sorted(SHAPES))
    ap.add_argument("--model-dir", type=Path, help="where the random model lives (per shape)")
    ap.add_argument(
        "--cprofile", action="store_true", help="also the Python functions' host time (cProfile)"
    )
    args = ap.parse_args()
    args.model_dir = args.model_dir or Path(SHAPES[args.shape])
    if args.impl == "unsloth":
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import unsloth  # noqa: F401  (before transformers, as it asks)
    make_random_model(args.model_dir, args.shape)
    step, _ = make_step(*build(args.impl, args.model_dir, args.seq))
    ids = torch.randint(0, 32000, (args.batch, args.seq)).cuda()

    import time

    for _ in range(3):
        step(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step(ids)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(ids)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    kernels = sorted(
        (e for e in ka if e.device_type.name == "CUDA"),  # kernels and copies, not the ops
        key=lambda e: -e.self_device_time_total,
    )
    n_kernels = sum(e.count for e in kernels) / 3
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 3 / 1e3
    print(
        f"{args.impl} {args.seq}x{args.batch}: {n_kernels:.0f} CUDA kernels/step, "
        f"GPU busy {gpu_ms:.1f} ms/step (side-stream copies overlap), wall {wall_ms:.1f} ms/step "
        f"({args.batch * args.seq / wall_ms * 1e3:.0f} tok/s)"
    )
    print(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    if args.cprofile:  # where the host's Python time goes (the profiler above sees only ops)
        import cProfile
        import pstats

        cp = cProfile.Profile()
        cp.enable()
        for _ in range(3):
            step(ids)
        torch.cuda.synchronize()
        cp.disable()
        st = pstats.Stats(cp).strip_dirs()
        st.sort_stats("tottime").print_stats(35)
        st.sort_stats("cumulative").print_stats(45)
    print(f"{'kernel (per step)':<90} {'calls':>6} {'ms':>8} {'avg us':>8}")
    for e in kernels[:40]:
        total = e.self_device_time_total / 3 / 1e3
        print(
            f"{e.key[:90]:<90} {e.count / 3:>6.0f} {total:>8.2f} {total * 1e3 / (e.count / 3):>8.1f}"
        )


if __name__ == "__main__":
    main()
