"""What the soul costs in held-out perplexity, by training length (shipped tiny model, CPU).

With the note's schedule α is forced to φ, the gate opens to σ(φ) ≈ 0.83 and, with R near the
identity, the logits are scaled by ≈ 1.83; only the LoRA can absorb that, and it needs steps at
the open gate. For each length this trains the soul (the demo's schedule shape: warmup 1/8,
anneal 5/8 of the steps) and the control (``--no-soul``) through the same loop and data, then
evaluates both on the same held-out tokens. Also shows the bare effect of the open gate on the
untrained base (logits × (1 + σ(φ))).

    python bench/soul_cost.py                 # 24 40 60 80 160 steps, ~10 min on 2 CPU cores
    python bench/soul_cost.py --steps 40 60
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[24, 40, 60, 80, 160])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    import torch

    from agiasi.data import default_dataset, default_heldout
    from agiasi.demo import tiny_model_path
    from agiasi.evaluate import EvalConfig, evaluate, hf_logits, perplexity
    from agiasi.train import TrainConfig, train

    base = tiny_model_path()
    heldout = default_heldout()
    ev = dict(text=str(heldout), window=256, max_tokens=args.eval_tokens)
    base_ppl = evaluate(EvalConfig(model=str(base), **ev))["perplexity"]

    # the open gate alone, on the untouched base: logits × (1 + σ(φ))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = tok(heldout.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    ids = ids[: args.eval_tokens]
    scale = 1 + 1 / (1 + math.exp(-(1 + 5**0.5) / 2))
    scaled_ppl = perplexity(lambda c: hf_logits(hf, c) * scale, ids, 256)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.steps:
            row = {"steps": n}
            for name, soul in (("soul", True), ("control", False)):
                t0 = time.time()
                r = train(
                    TrainConfig(
                        base_model=str(base),
                        dataset=str(default_dataset()),
                        output_dir=f"{tmp}/{name}_{n}",
                        max_steps=n,
                        warmup_steps=max(1, n // 8),
                        annealing_steps=max(1, n * 5 // 8),
                        batch_size=4,
                        max_length=256,
                        learning_rate=1e-3,
                        save_steps=n,
                        soul=soul,
                        seed=0,
                        progress=False,
                    ),
                    log=lambda m: None,
                )
                row[name] = evaluate(EvalConfig(model=str(r.final_checkpoint), **ev))["perplexity"]
                row[f"{name}_s"] = time.time() - t0
            row["steps_at_phi"] = n - max(1, n // 8) - max(1, n * 5 // 8)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(
        f"\nheld-out {heldout.name}, {len(ids)} tokens, window 256; base {base_ppl:.2f}; "
        f"base with logits × {scale:.3f} (open gate, R = I, no training): {scaled_ppl:.1f}\n"
    )
    print("steps  at φ   soul ppl  control ppl  soul/control  soul/base")
    for r in rows:
        print(
            f"{r['steps']:>5} {r['steps_at_phi']:>5} {r['soul']:>10.2f} {r['control']:>12.2f} "
            f"{r['soul'] / r['control']:>13.2f} {r['soul'] / base_ppl:>10.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"base": base_ppl, "scaled_base": scaled_ppl, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
