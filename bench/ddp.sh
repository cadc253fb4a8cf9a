#!/usr/bin/env bash
# 1 GPU × grad-accum 2 vs 2 GPUs (torchrun DDP) through the real `agiasi train` loop, on a
# random-weight Phi-3.5-mini (NF4, LoRA r16, so8 soul), seq 2048 × batch 1 per micro-batch.
# Needs 2 GPUs; writes metrics to $OUT (or /tmp). Usage: bash bench/ddp.sh [STEPS]
set -euo pipefail
STEPS=${1:-24}
OUTDIR=${OUT:-/tmp}
python3 -c "import sys; sys.path.insert(0, 'bench'); from train import make_random_model; from pathlib import Path; make_random_model(Path('/tmp/phi35-random'))"
cp src/agiasi/assets/tiny-ja-phi3/tokenizer* /tmp/phi35-random/
COMMON="--base-model /tmp/phi35-random --max-length 2048 --batch-size 1 --max-steps $STEPS --save-steps 100000 --warmup-steps 4 --annealing-steps 16 --lora-dropout 0 --no-progress --seed 1"
python3 -m agiasi train $COMMON --grad-accum 2 --output-dir /tmp/ddp_one 2>&1 | tail -3
torchrun --nproc-per-node 2 -m agiasi train $COMMON --output-dir /tmp/ddp_two 2>&1 | tail -3
cp /tmp/ddp_one/metrics.jsonl "$OUTDIR/one_gpu_metrics.jsonl"
cp /tmp/ddp_two/metrics.jsonl "$OUTDIR/two_gpu_metrics.jsonl"
python3 - <<'PY'
import json, statistics
def load(p): return [json.loads(x) for x in open(p)]
a, b = load("/tmp/ddp_one/metrics.jsonl"), load("/tmp/ddp_two/metrics.jsonl")
ta = statistics.median(r["tokens_per_s"] for r in a[3:])
tb = statistics.median(r["tokens_per_s"] for r in b[3:])
print(f"1 GPU x accum 2: {ta:.0f} tok/s   2 GPUs DDP: {tb:.0f} tok/s   speed-up {tb / ta:.2f}x")
print(f"peak mem GiB: 1 GPU {max(r['peak_mem_gib'] for r in a):.2f}, 2 GPUs (rank 0) {max(r['peak_mem_gib'] for r in b):.2f}")
d = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
print(f"max |loss difference| over {len(a)} steps: {d:.4f}; final {a[-1]['loss']:.4f} vs {b[-1]['loss']:.4f}")
PY
