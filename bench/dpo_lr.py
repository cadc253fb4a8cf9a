"""Which learning rate to default to for LoRA DPO / ORPO, measured (CPU, shipped tiny model, NF4).

TRL documents ~5e-6 for full-model DPO and Unsloth's DPO notebooks use 5e-6; LoRA moves far fewer
weights, and SFT with LoRA uses 2e-4. This trains the realistic path — an SFT run on the
shipped sample (the demo's 60 steps), then ``--method dpo`` / ``orpo`` ``--init-from`` its last
step — at each rate, on preference pairs made from the shipped Japanese text (the prompt asks to
continue a sentence's first half; chosen: its real second half; rejected: another sentence's),
and scores held-out pairs made the same way from the held-out text (reward accuracy, margin,
validation loss) and the held-out perplexity of both texts (what the run cost the language).

    OMP_NUM_THREADS=2 python bench/dpo_lr.py --json bench/data/2026-12-07_cpu_dpo_lr.json   # ~6 min
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

from heldout import heldout_ppl  # bench/heldout.py

RATES = (5e-6, 5e-5, 2e-4, 5e-4)
PROMPT = "次の文の続きを書いてください：{}"


def sentence_pairs(text: str, seed: int, limit: int) -> list[dict]:
    """Preference pairs from sentences of 20–80 characters, cut in the middle."""
    sents = [s.strip() + "。" for s in re.split(r"。", text) if 20 <= len(s.strip()) <= 80]
    rng = random.Random(seed)
    rng.shuffle(sents)
    sents = sents[: limit + 1]
    out = []
    for i, s in enumerate(sents[:limit]):
        other = sents[i + 1]
        cut, ocut = len(s) // 2, len(other) // 2
        out.append({"prompt": PROMPT.format(s[:cut]), "chosen": s[cut:], "rejected": other[ocut:]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    ap.add_argument("--methods", nargs="+", default=["dpo", "orpo"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from agiasi.shipped import default_dataset, default_heldout, tiny_model_path
    from agiasi.train.loop import TrainConfig, train

    base = str(tiny_model_path())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, src, n in (("train", default_dataset(), 400), ("eval", default_heldout(), 64)):
            pairs = sentence_pairs(src.read_text(encoding="utf-8"), 0, n)
            (tmp / f"{name}.jsonl").write_text(
                "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), "utf-8"
            )
        common = dict(base_model=base, batch_size=4, max_length=128, seed=0, progress=False,
                      gradient_checkpointing=False)  # fmt: skip
        sft = train(
            TrainConfig(**common, max_steps=60, learning_rate=1e-3, warmup_steps=7,
                        annealing_steps=37, output_dir=str(tmp / "sft"), save_steps=10_000),
            log=lambda m: None,
        ).final_checkpoint  # fmt: skip
        start = {"rate": None, "method": "sft start", "ppl": heldout_ppl(sft, 4096)}
        print(json.dumps(start), flush=True)
        rows.append(start)
        for method in args.methods:
            for rate in args.rates:
                t0 = time.time()
                out = tmp / f"{method}_{rate:g}"
                r = train(
                    TrainConfig(
                        **common,
                        method=method,
                        init_from=str(sft),
                        dataset=str(tmp / "train.jsonl"),
                        eval_dataset=str(tmp / "eval.jsonl"),
                        eval_steps=args.steps // 4,
                        max_steps=args.steps,
                        learning_rate=rate,
                        output_dir=str(out),
                        save_steps=10_000,
                    ),
                    log=lambda m: None,
                )
                lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                first = next(x for x in lines if "eval_loss" in x)
                last = [x for x in lines if "eval_loss" in x][-1]
                row = {
                    "method": method,
                    "rate": rate,
                    "eval_loss": last["eval_loss"],
                    "eval_accuracy": last["eval_accuracy"],
                    "eval_margin": last["eval_margin"],
                    "first_eval_accuracy": first["eval_accuracy"],
                    "ppl": heldout_ppl(r.final_checkpoint, 4096),
                    "seconds": round(time.time() - t0, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nSFT start: held-out ppl mew {start['ppl']['mew']:.2f} history "
          f"{start['ppl']['history']:.2f}")  # fmt: skip
    print("method | rate   | eval acc | margin  | eval loss | ppl mew | ppl history")
    for r in rows[1:]:
        print(f"{r['method']:6} | {r['rate']:<6g} | {r['eval_accuracy']:8.3f} | "
              f"{r['eval_margin']:7.3f} | {r['eval_loss']:9.4f} | {r['ppl']['mew']:7.2f} | "
              f"{r['ppl']['history']:7.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
