#!/usr/bin/env bash
# 1 GPU × grad-accum 2 vs 2 GPUs (torchrun DDP) through the real `agiasi train` loop, on a
# random-weight Phi-3.5-mini (NF4, LoRA r16, so8 soul), seq 2048 × batch 1 per micro-batch.
# Needs NPROC GPUs (default 2); writes metrics to $OUT (or /tmp).
# Usage: [NPROC=4] bash bench/ddp.sh [STEPS]
set -euo pipefail
STEPS=${1:-24}
NPROC=${NPROC:-2}
OUTDIR=${OUT:-/tmp}
python3 -c "import sys; sys.path.insert(0, 'bench'); from train import make_random_model; from pathlib import Path; make_random_model(Path('/tmp/phi35-random'))"
cp src/agiasi/assets/tiny-ja-phi3/tokenizer* /tmp/phi35-random/
COMMON="--base-model /tmp/phi35-random --max-length 2048 --batch-size 1 --max-steps $STEPS --save-steps 100000 --warmup-steps 4 --annealing-steps 16 --lora-dropout 0 --no-progress --seed 1"
python3 -m agiasi train $COMMON --grad-accum "$NPROC" --output-dir /tmp/ddp_one 2>&1 | tail -3
torchrun --nproc-per-node "$NPROC" -m agiasi train $COMMON --output-dir /tmp/ddp_two 2>&1 | tail -3
cp /tmp/ddp_one/metrics.jsonl "$OUTDIR/one_gpu_metrics.jsonl"
cp /tmp/ddp_two/metrics.jsonl "$OUTDIR/two_gpu_metrics.jsonl"
NPROC=$NPROC python3 - <<'PY'
import json, statistics
def load(p): return [json.loads(x) for x in open(p)]
a, b = load("/tmp/ddp_one/metrics.jsonl"), load("/tmp/ddp_two/metrics.jsonl")
ta = statistics.median(r["tokens_per_s"] for r in a[3:])
tb = statistics.median(r["tokens_per_s"] for r in b[3:])
import os
n = os.environ.get("NPROC", "2")
print(f"1 GPU x accum {n}: {ta:.0f} tok/s   {n} GPUs DDP: {tb:.0f} tok/s   speed-up {tb / ta:.2f}x")
print(f"peak mem GiB: 1 GPU {max(r['peak_mem_gib'] for r in a):.2f}, 2 GPUs (rank 0) {max(r['peak_mem_gib'] for r in b):.2f}")
d = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
print(f"max |loss difference| over {len(a)} steps: {d:.4f}; final {a[-1]['loss']:.4f} vs {b[-1]['loss']:.4f}")
PY
