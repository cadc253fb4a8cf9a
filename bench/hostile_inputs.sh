#!/usr/bin/env bash
# Time and peak RSS of the commands that once read whole files where a slice was asked for:
# `agiasi eval --max-tokens 2048` of a 200 MB Japanese text and `agiasi data` of a 32 MB one.
# Usage: bash bench/hostile_inputs.sh SRC [SRC ...]   (each SRC a checkout's src/ folder, so a
# before/after pair runs in one call on one machine). Needs GNU time (/usr/bin/time).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${TMPDIR:-/tmp}/agiasi-hostile-inputs"
mkdir -p "$WORK"
python - "$ROOT" "$WORK" <<'PY'
import sys
from pathlib import Path
root, work = Path(sys.argv[1]), Path(sys.argv[2])
piece = (root / "src/agiasi/assets/data/heldout_ja.txt").read_bytes()
if not (work / "big200.txt").exists():
    with open(work / "big200.txt", "wb") as f:
        for _ in range(200 * 2**20 // len(piece) + 1):
            f.write(piece)
if not (work / "big32.txt").exists():
    line = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。\n"
    with open(work / "big32.txt", "w", encoding="utf-8") as f:
        for _ in range(8):
            f.write(line * 40_000 + "\n")
PY
MODEL="$ROOT/src/agiasi/assets/tiny-ja-phi3"
for SRC in "$@"; do
  for cmd in "eval $MODEL --text $WORK/big200.txt --max-tokens 2048 --window 256" \
             "data $WORK/big32.txt --json" "data $WORK/big32.txt"; do
    /usr/bin/time -f "%e s %M KB" -o "$WORK/time.txt" env PYTHONPATH="$SRC" \
      ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 timeout 600 \
      python -m agiasi $cmd > /dev/null 2> "$WORK/err.txt"
    rc=$?
    echo "$SRC :: agiasi ${cmd//$WORK\//} :: rc=$rc $(tail -1 "$WORK/time.txt") $( [ $rc -ne 0 ] && tail -1 "$WORK/err.txt" | cut -c1-160)"
  done
done
