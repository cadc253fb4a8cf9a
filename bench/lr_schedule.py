"""Which learning-rate schedule to default to, measured (CPU, shipped tiny model, NF4 as the demo).

For each setting — the demo's (60 steps, peak 1e-3, batch 4 × 256) and the design note's
(500 steps, peak 2e-4, α warm-up 50 + anneal 400, same batch) — this trains the default convex
soul and the ``--no-soul`` control through the same loop, data and seed with each schedule:
``constant`` without warm-up (agiasi before the schedule existed), and ``constant``, ``linear``,
``cosine`` with a 3 % warm-up; then scores every final checkpoint on two held-out texts (the
shipped ``heldout_ja.txt`` and ``bench/data/heldout_history_ja.txt``, another domain).

    OMP_NUM_THREADS=1 python bench/lr_schedule.py --json bench/data/lr_schedule_cpu.json
    python bench/lr_schedule.py --settings demo       # ~3 min
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from heldout import heldout_ppl  # bench/heldout.py

SETTINGS = {
    "demo": {"max_steps": 60, "learning_rate": 1e-3, "warmup_steps": 7, "annealing_steps": 37},
    "note": {"max_steps": 500, "learning_rate": 2e-4, "warmup_steps": 50, "annealing_steps": 400},
}
SCHEDULES = {
    "constant, no warm-up": {"lr_scheduler": "constant", "lr_warmup_ratio": 0.0},
    "constant": {"lr_scheduler": "constant", "lr_warmup_ratio": 0.03},
    "linear": {"lr_scheduler": "linear", "lr_warmup_ratio": 0.03},
    "cosine": {"lr_scheduler": "cosine", "lr_warmup_ratio": 0.03},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    from agiasi.shipped import default_dataset, tiny_model_path
    from agiasi.train.loop import TrainConfig, train

    base = tiny_model_path()

    def ppl(model: Path) -> dict[str, float]:
        return heldout_ppl(model, args.eval_tokens)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            for sched, sched_opts in SCHEDULES.items():
                for soul in (True, False):
                    t0 = time.time()
                    name = f"{setting}_{sched.replace(', ', '_').replace(' ', '-')}_{soul}"
                    r = train(
                        TrainConfig(
                            base_model=str(base),
                            dataset=str(default_dataset()),
                            output_dir=f"{tmp}/{name}",
                            batch_size=4,
                            max_length=256,
                            save_steps=10_000,
                            seed=0,
                            soul=soul,
                            gradient_checkpointing=False,
                            progress=False,
                            **SETTINGS[setting],
                            **sched_opts,
                        ),
                        log=lambda m: None,
                    )
                    row = {
                        "setting": setting,
                        "schedule": sched,
                        "soul": soul,
                        "ppl": ppl(r.final_checkpoint),
                        "seconds": round(time.time() - t0, 1),
                    }
                    rows.append(row)
                    print(json.dumps(row, ensure_ascii=False), flush=True)

    print("\nsetting | schedule              | soul: mew  history | control: mew  history")
    for setting in args.settings:
        for sched in SCHEDULES:
            s, c = (
                next(
                    r
                    for r in rows
                    if r["setting"] == setting and r["schedule"] == sched and r["soul"] is v
                )["ppl"]
                for v in (True, False)
            )
            print(
                f"{setting:7} | {sched:21} | {s['mew']:9.2f} {s['history']:8.2f} | "
                f"{c['mew']:12.2f} {c['history']:8.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
