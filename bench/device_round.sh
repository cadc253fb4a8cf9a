#!/usr/bin/env bash
# One device call's worth of benchmark jobs, each under its own time limit and all under one
# budget, so a slow job costs only itself and the call returns before the device's limit:
#
#   bash bench/device_round.sh bench/jobs/issue24_next.txt      # on the GPU machine, in the repo root
#
# A job file has one job a line: NAME SECONDS COMMAND... (# starts a comment; $OUT is where the
# logs and JSON go: the device tool's output folder, else bench/out/). It unpacks
# .whl/site.tar.xz (bench/gpu_carry.sh) onto PYTHONPATH first. BUDGET (seconds, default 570)
# caps the whole call; a job that would start with under 20 s left is skipped and says so.
set -u
jobs_file=$1
BUDGET=${BUDGET:-570}
OUT=${OUT:-bench/out}
mkdir -p "$OUT" /tmp/site
start=$SECONDS
if [ -f .whl/site.tar.xz ]; then tar xJf .whl/site.tar.xz -C /tmp/site; fi
export OUT PYTHONPATH=/tmp/site:src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
while read -r name want cmd; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  left=$((BUDGET - (SECONDS - start)))
  limit=$((want < left ? want : left))
  if ((left < 20)); then echo "SKIP $name (${left} s left)"; continue; fi
  echo "=== $name, limit $limit s, $(date -u +%FT%TZ)"
  timeout "$limit" bash -c "$cmd" >"$OUT/$name.log" 2>&1
  echo "rc=$? $name at $((SECONDS - start)) s"
  tail -20 "$OUT/$name.log"
done <"$jobs_file"
