"""Packing vs padding on a chat dataset of short Japanese turns (GPU, Phi-3.5-mini's shape).

Both runs go through ``agiasi train`` itself (NF4, soul, gradient checkpointing), same data,
seed and steps; only ``--packing`` differs. Padded: ``--batch-size 16`` conversations a step,
each batch padded to its longest; packed: ``--batch-size 2`` rows of ``--max-length 1024``
tokens holding as many conversations as fit. Reported from ``metrics.jsonl`` after the warm-up
steps: non-padding tokens per second and per step, and the peak GPU memory.

    python bench/packing.py --json bench/data/packing_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def short_turns(n: int) -> list[dict]:
    """Conversations from the shipped sample: a line's first sentence asks, the rest answers."""
    from agiasi.shipped import default_dataset

    convs = []
    for line in default_dataset().read_text(encoding="utf-8").splitlines():
        head, sep, rest = line.partition("。")
        if sep and 8 <= len(rest) <= 160:
            q = f"{head}。について説明してください。"
            convs.append(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": rest},
                    ]
                }
            )
        if len(convs) == n:
            break
    return convs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from train import make_random_model  # bench/train.py

    from agiasi.demo import tiny_model_path
    from agiasi.train.loop import TrainConfig, train

    work = Path(tempfile.mkdtemp())
    model = work / "phi35-shape"
    make_random_model(model)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = tiny_model_path() / f
        if src.exists():
            (model / f).write_bytes(src.read_bytes())
    data = work / "chat.jsonl"
    convs = short_turns(4000)
    data.write_text(
        "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8"
    )
    rows = {}
    for name, opts in (
        ("padded", {"batch_size": 16}),
        ("packed", {"batch_size": 2, "packing": True}),
    ):
        torch.cuda.reset_peak_memory_stats()
        r = train(
            TrainConfig(
                base_model=str(model),
                dataset=str(data),
                output_dir=str(work / name),
                max_steps=args.steps,
                save_steps=10_000,
                max_length=1024,
                progress=False,
                **opts,
            ),
            log=lambda m: print(m, flush=True) if m.startswith("data:") else None,
        )
        ms = [json.loads(x) for x in r.metrics_file.read_text().splitlines()][args.warmup :]
        tokens = sum(m["tokens"] for m in ms)
        secs = sum(m["step_time_s"] for m in ms)
        rows[name] = {
            "conversations": len(convs),
            "non_pad_tokens_per_step": tokens / len(ms),
            "non_pad_tokens_per_s": tokens / secs,
            "step_time_s": secs / len(ms),
            "peak_mem_gib": max(m["peak_mem_gib"] for m in ms),
        }
        print(name, json.dumps(rows[name]), flush=True)
        torch.cuda.empty_cache()
    p, q = rows["packed"], rows["padded"]
    print(
        f"\npacked / padded: non-padding tokens/s x{p['non_pad_tokens_per_s'] / q['non_pad_tokens_per_s']:.2f}, "
        f"peak memory {p['peak_mem_gib']:.2f} vs {q['peak_mem_gib']:.2f} GiB"
    )
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), **rows}, indent=2))


if __name__ == "__main__":
    main()
