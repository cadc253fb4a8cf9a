"""What the soul costs in held-out perplexity, by training length, for both mixes (CPU, shipped
tiny model).

For each length this trains, through the same loop, data and seed: the default ``convex`` soul
(h + g·(R h − h)), the design note's ``residual`` soul (h + g·R h) — both with the demo's
schedule shape (warmup 1/8, anneal 5/8 of the steps, then α = φ) — and the ``--no-soul``
control; then scores each on two held-out texts: the shipped ``heldout_ja.txt`` (the part of the
Mew manual the training text is not) and ``bench/data/heldout_history_ja.txt`` (another domain:
the Debian project's history; the tiny model saw neither). With ``--alpha-mode learned`` (α
trained from −5, soul learning rate 5e-2) it also shows where each mix sends α.

    python bench/soul_cost.py --json bench/data/soul_cost_cpu.json   # ~12 min on 2 CPU cores
    python bench/soul_cost.py --steps 40 60
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from heldout import heldout_ppl, heldout_texts  # bench/heldout.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[24, 40, 60, 80, 160])
    ap.add_argument("--learned-steps", type=int, default=60)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    import torch

    from agiasi.eval.models import hf_logits
    from agiasi.eval.perplexity import perplexity, text_ids
    from agiasi.shipped import default_dataset, tiny_model_path
    from agiasi.soul import PHI
    from agiasi.train.loop import TrainConfig, train

    base = tiny_model_path()
    texts = heldout_texts()

    def ppl(model: Path) -> dict[str, float]:
        return heldout_ppl(model, args.eval_tokens)

    base_ppl = ppl(base)
    # the residual mix's open gate alone, on the untouched base: logits × (1 + σ(φ))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    scale = 1 + 1 / (1 + math.exp(-PHI))
    ids, _ = text_ids(tok, texts["mew"], args.eval_tokens)
    scaled = perplexity(lambda c: hf_logits(hf, c) * scale, ids, 256)

    def run(tmp: str, name: str, n: int, **opts) -> dict:
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
                seed=0,
                gradient_checkpointing=False,
                progress=False,
                **opts,
            ),
            log=lambda m: None,
        )
        row = {"ppl": ppl(r.final_checkpoint), "seconds": time.time() - t0}
        soul = json.loads((r.final_checkpoint / "soul.json").read_text())["soul"]
        if soul:
            row.update(alpha=soul["alpha"], gate=soul["gate"])
            last = json.loads(r.metrics_file.read_text().splitlines()[-1])
            row["rotation_distance"] = last["rotation_distance"]
        return row

    rows, learned = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.steps:
            row = {"steps": n, "steps_at_phi": n - max(1, n // 8) - max(1, n * 5 // 8)}
            row["convex"] = run(tmp, "convex", n)
            row["residual"] = run(tmp, "residual", n, soul_mix="residual")
            row["control"] = run(tmp, "control", n, soul=False)
            rows.append(row)
            print(json.dumps(row), flush=True)
        for mix in ("convex", "residual"):
            learned[mix] = run(
                tmp,
                f"learned_{mix}",
                args.learned_steps,
                soul_mix=mix,
                alpha_mode="learned",
                soul_learning_rate=5e-2,
            )
            print(mix, "learned", json.dumps(learned[mix]), flush=True)

    print(
        f"\nbase: mew {base_ppl['mew']:.2f}, history {base_ppl['history']:.2f}; base with logits "
        f"x {scale:.3f} (the residual mix's open gate at R = I, nothing trained): mew {scaled:.1f}\n"
    )
    print("steps at φ |   mew: convex residual control  conv/ctl |  history: convex residual "
          "control  conv/ctl | ‖R−I‖ convex")  # fmt: skip
    for r in rows:
        c, s, k = r["convex"]["ppl"], r["residual"]["ppl"], r["control"]["ppl"]
        print(
            f"{r['steps']:>5} {r['steps_at_phi']:>4} | {c['mew']:>12.2f} {s['mew']:>8.2f} "
            f"{k['mew']:>7.2f} {c['mew'] / k['mew']:>9.3f} | {c['history']:>16.2f} "
            f"{s['history']:>8.2f} {k['history']:>7.2f} {c['history'] / k['history']:>9.3f} | "
            f"{r['convex']['rotation_distance']:.3f}"
        )
    for mix, r in learned.items():
        print(
            f"learned α, {mix}, {args.learned_steps} steps: α −5 → {r['alpha']:.2f} "
            f"(gate {r['gate']:.4f}); ppl mew {r['ppl']['mew']:.2f}, history {r['ppl']['history']:.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"base": base_ppl, "scaled_base_mew": scaled, "rows": rows, "learned": learned},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
