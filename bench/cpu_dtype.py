"""CPU training speed by compute dtype: the default (float32) against bf16 (the old default).

On a CPU without native bf16 (AVX2 only: most laptops, desktops and cloud VMs) bf16 matmuls are
emulated and run 40-70x slower than fp32; bitsandbytes' 4-bit backward runs in the compute
dtype, so NF4 training inherits that. This times `agiasi train`'s real step on the shipped tiny
model (NF4, batch 4 x 256, the demo's shape) for each dtype, one process each, and a bare
1024x256 @ 256x768 matmul. To see what a CPU without native bf16 does on one that has it:

    python bench/cpu_dtype.py                 # this CPU as it is
    python bench/cpu_dtype.py --emulate-avx2  # the same with oneDNN and ATen held to AVX2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def child(dtype: str, steps: int) -> None:
    """One process: a few real training steps, median step time from metrics.jsonl."""
    import torch

    from agiasi.demo import tiny_model_path
    from agiasi.train.loop import TrainConfig, train

    a, b = torch.randn(1024, 256), torch.randn(256, 768)
    mm = {}
    for dt in (torch.float32, torch.bfloat16):
        x, y = a.to(dt), b.to(dt)
        for _ in range(3):
            x @ y
        t0 = time.perf_counter()
        for _ in range(10):
            x @ y
        mm[str(dt).removeprefix("torch.")] = (time.perf_counter() - t0) / 10
    with tempfile.TemporaryDirectory() as tmp:
        r = train(
            TrainConfig(
                base_model=str(tiny_model_path()),
                output_dir=tmp,
                max_steps=steps,
                warmup_steps=1,
                annealing_steps=1,
                batch_size=4,
                max_length=256,
                save_steps=10_000,
                dtype=dtype,
                progress=False,
            ),
            log=lambda m: None,
        )
        rows = [json.loads(x) for x in r.metrics_file.read_text().splitlines()]
    times = [row["step_time_s"] for row in rows[1:]]  # the first step warms up
    print(
        json.dumps(
            {
                "dtype": dtype,
                "capability": torch.backends.cpu.get_cpu_capability(),
                "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                "threads": torch.get_num_threads(),
                "step_s": statistics.median(times),
                "tokens_per_s": statistics.median(row["tokens_per_s"] for row in rows[1:]),
                "matmul_ms": {k: v * 1e3 for k, v in mm.items()},
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emulate-avx2", action="store_true", help="hold oneDNN/ATen to AVX2")
    ap.add_argument("--steps", type=int, default=4, help="steps per dtype (first is warm-up)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    env = {**os.environ, **(AVX2_ENV if args.emulate_avx2 else {})}
    results = []
    for dtype in ("auto", "bfloat16"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", dtype, "--steps", str(args.steps)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r0 = results[0]
    print(
        f"\nCPU capability {r0['capability']}, native bf16 {r0['native_bf16']}, "
        f"{r0['threads']} threads; matmul 1024x256 @ 256x768: fp32 {r0['matmul_ms']['float32']:.1f} ms, "
        f"bf16 {r0['matmul_ms']['bfloat16']:.1f} ms\n"
    )
    print("dtype                  s/step   tokens/s   x default")
    for r in results:
        label = "auto (float32)" if r["dtype"] == "auto" else r["dtype"]
        print(
            f"{label:<20} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
            f"{r['tokens_per_s'] / r0['tokens_per_s']:>10.3f}"
        )


if __name__ == "__main__":
    main()
