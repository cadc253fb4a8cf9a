"""Data-parallel scaling of `agiasi train`: N GPUs (torchrun) against 1 GPU with gradient
accumulation N — the same global batch and data — on a random-weight Phi-3.5-mini (NF4, LoRA r16,
so8 soul), seq 2048 x batch 1 per micro-batch.

Per run: median tokens/s over the steady steps (after the first 4), the step time's spread,
the previous step's forward+backward GPU time averaged over ranks and its spread across ranks
(from CUDA events, carried in the step's one all-reduce), the host's wait at the step's one sync,
peak memory per GPU (rank 0), and the largest |loss difference| against the 1-GPU run.

    python bench/ddp.py --gpus 1,2,4 --steps 24        # on a 4-GPU machine, one call
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(
    n_gpus: int, accum: int, steps: int, seq: int, base: Path, out: Path, extra: list[str]
) -> list[dict]:
    common = [
        "-m", "agiasi", "train", "--base-model", str(base), "--max-length", str(seq),
        "--batch-size", "1", "--max-steps", str(steps), "--save-steps", "100000",
        "--warmup-steps", "4", "--annealing-steps", "16", "--lora-dropout", "0",
        "--no-progress", "--seed", "1", "--grad-accum", str(accum), "--output-dir", str(out),
        "--overwrite", *extra,
    ]  # fmt: skip
    if n_gpus == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n_gpus),
               *common]  # fmt: skip
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if p.returncode != 0:
        raise SystemExit(f"{n_gpus} GPU(s) failed:\n{p.stderr[-4000:]}")
    print(f"  {n_gpus} GPU(s) x accum {accum}: {time.time() - t0:.0f} s", flush=True)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def summary(rows: list[dict], skip: int = 4) -> dict:
    steady = rows[skip:]
    st = [r["step_time_s"] for r in steady]
    out = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_s": statistics.median(st),
        "step_s_p10_p90": [sorted(st)[len(st) // 10], sorted(st)[len(st) * 9 // 10]],
        "peak_mem_gib": max(r["peak_mem_gib"] for r in rows),
        "sync_wait_s": statistics.median(r.get("sync_wait_s", 0.0) for r in steady),
    }
    comp = [r["compute_s_prev"] for r in steady if "compute_s_prev" in r]
    if comp:
        out["compute_s"] = statistics.median(comp)
        out["compute_rank_std_s"] = statistics.median(
            r["compute_s_prev_rank_std"] for r in steady if "compute_s_prev" in r
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="1,2,4")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step on each GPU")
    ap.add_argument("--work", type=Path, default=Path("/tmp/agiasi_ddp"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compile", action="store_true", help="--compile on both sides")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from train import make_random_model

    base = args.work / "phi35-random"
    if not (base / "config.json").exists():
        make_random_model(base)
        for f in (ROOT / "src/agiasi/assets/tiny-ja-phi3").glob("tokenizer*"):
            (base / f.name).write_bytes(f.read_bytes())
    counts = [int(x) for x in args.gpus.split(",") if int(x) > 1]
    extra = ["--compile"] if args.compile else []
    results = {}
    for n in counts:
        k = args.accum
        one = run(1, n * k, args.steps, args.seq, base, args.work / f"one_x{n * k}", extra)
        many = run(n, k, args.steps, args.seq, base, args.work / f"ddp_{n}_x{k}", extra)
        s1, sn = summary(one), summary(many)
        dloss = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, many, strict=True))
        results[n] = {"one_gpu": s1, "ddp": sn, "speedup": sn["tokens_per_s"] / s1["tokens_per_s"],
                      "max_abs_dloss": dloss}  # fmt: skip
    print(
        f"\nseq {args.seq} x batch 1 per GPU, {args.steps} steps, medians over steps 5-{args.steps}\n"
    )
    print("GPUs  1 GPU x accum N tok/s   N GPUs tok/s   speed-up  step s (p10-p90)       "
          "compute s ± rank std   sync wait s  peak GiB 1 / N  max|dloss|")  # fmt: skip
    for n, r in results.items():
        a, b = r["one_gpu"], r["ddp"]
        print(
            f"{n:>4} {a['tokens_per_s']:>22,.0f} {b['tokens_per_s']:>14,.0f} {r['speedup']:>9.2f}x  "
            f"{b['step_s']:.3f} ({b['step_s_p10_p90'][0]:.3f}-{b['step_s_p10_p90'][1]:.3f})  "
            f"{b.get('compute_s', 0):>9.3f} ± {b.get('compute_rank_std_s', 0):.4f}   "
            f"{b['sync_wait_s']:>10.4f}  {a['peak_mem_gib']:.2f} / {b['peak_mem_gib']:.2f}  "
            f"{r['max_abs_dloss']:.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
