"""JGLUE scoring speed: ``agiasi eval --task`` against lm-evaluation-harness's ``hf`` model on the
same model and items, in one run (items/s of each and the ratio; the accuracies must agree).

On the CPU the model is the shipped tiny one (fp32). On a GPU it is a random-weight model with
Phi-3.5-mini's exact shape (3.8 B, bf16; random weights cost the same time as real ones) with the
shipped tokenizer (its ids are < 8,000 of the 32,064 rows). lm-eval runs with ``batch_size``
32 on the GPU, 8 on the CPU; agiasi with its default token budget. In bf16 the two sums round
differently, so the GPU rows report the share of items where both pick the same choice.

    python bench/jglue_speed.py                       # CPU: shipped model, both tasks, 0-shot
    python bench/jglue_speed.py --device cuda --num-fewshot 3 --out bench/data/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gpu_model(path: Path) -> Path:
    from agiasi.shipped import tiny_model_path
    from bench.train import make_random_model

    make_random_model(path)
    for name in (
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        shutil.copy(tiny_model_path() / name, path / name)
    return path


def run(model_dir: Path, device: str, task: str, shots: int, limit: int | None) -> dict:
    import torch

    from agiasi.eval.benchmark import score_set
    from agiasi.eval.models import open_eval_model
    from agiasi.eval.tasks import TASKS, prepare
    from bench.lm_eval_crosscheck import lm_eval_items

    ts = prepare(TASKS[task], num_fewshot=shots, limit=limit)
    model = open_eval_model(model_dir, device=device)
    score_set(model, prepare(TASKS[task], limit=8), chat=False)  # warm-up (kernels, caches)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ours = score_set(model, ts, chat=False)
    if device == "cuda":
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ref = lm_eval_items(
            model_dir,
            ts,
            False,
            Path(tmp),
            device=device,
            dtype="bfloat16" if device == "cuda" else "float32",
            batch_size=32 if device == "cuda" else 8,
        )
        ref_s = time.perf_counter() - t0  # includes lm-eval's own set-up (a few seconds)
    same = sum(
        (a["pred"] == a["gold"]) == bool(b["acc"])
        for a, b in zip(ours["per_item"], ref, strict=True)
    )
    return {
        "task": task,
        "num_fewshot": shots,
        "items": len(ts.items),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "agiasi_items_per_s": len(ts.items) / ours_s,
        "lm_eval_items_per_s": len(ts.items) / ref_s,
        "speed_ratio": ref_s / ours_s,
        "acc_agiasi": ours["acc"],
        "acc_lm_eval": sum(r["acc"] for r in ref) / len(ref),
        "same_outcome": same / len(ref),
        "agiasi_peak_gib": peak,
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--task", default="jcommonsenseqa,jnli")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.model is None:
        from agiasi.shipped import tiny_model_path

        args.model = (
            gpu_model(Path(tempfile.gettempdir()) / "phi35-random")
            if args.device == "cuda"
            else tiny_model_path()
        )
    for task in args.task.split(","):
        shots = 0 if task == "jnli" else args.num_fewshot  # JNLI: no train split for lm-eval
        r = run(args.model, args.device, task, shots, args.limit)
        print(json.dumps(r, ensure_ascii=False), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
