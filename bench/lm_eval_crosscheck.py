"""agiasi's JGLUE scoring against lm-evaluation-harness on the same model, items and prompts.

lm-eval runs its own ``ja_leaderboard_jcommonsenseqa`` / ``ja_leaderboard_jnli`` task configs
(``include``d from the installed package, so the prompts are its own), pointed at the same local
JGLUE files, with its ``hf`` model on an HF folder; agiasi scores the same folder. Compared per
item: the prompt string and the continuations (byte-equal), every choice's log-likelihood (within
``RTOL`` of its magnitude) and greedy flag, the predicted choice, and the accuracies.

One difference in the files, by design: lm-eval reads JNLI labels as the HF dataset's class
indices (entailment 0, contradiction 1, neutral 2), JGLUE's files spell them out; the copy
handed to lm-eval has the indices (agiasi reads both).

    python bench/lm_eval_crosscheck.py                        # both tasks, full, 0-shot
    python bench/lm_eval_crosscheck.py --limit 50 --num-fewshot 3 --chat-template
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# fp32 log-likelihoods summed over a few tokens: two implementations differ only in reduction
# order and kernels (packed rows vs one sequence per choice), ~1e-7 relative a step; 1e-4 of the
# magnitude is ~1000 ulps of float32 and still far below any gap that changes a choice.
RTOL = 1e-4
ATOL = 1e-4


def _lm_eval_task_dir(workdir: Path, task, data: Path, pool: Path | None) -> str:
    import lm_eval

    from agiasi.eval.tasks import JNLI_LABELS, read_items

    src = Path(lm_eval.__file__).parent / "tasks" / "japanese_leaderboard" / f"{task.lm_eval}.yaml"
    files = {"validation": data}
    if pool is not None:
        files["train"] = pool
    if task.name == "jnli":  # class indices, as the HF dataset lm-eval expects has them
        for split, path in list(files.items()):
            out = workdir / f"jnli-{split}.json"
            with out.open("w", encoding="utf-8") as fh:
                for it in read_items(task, path):
                    lab = it["label"]
                    it = {**it, "label": lab if isinstance(lab, int) else JNLI_LABELS.index(lab)}
                    fh.write(json.dumps(it, ensure_ascii=False) + "\n")
            files[split] = out
    if "train" not in files:
        files["train"] = files["validation"]  # lm-eval wants the split; 0-shot never reads it
    name = f"agiasi_{task.name}"
    lines = [f"include: {src}", f"task: {name}", "dataset_path: json", "dataset_name: null"]
    lines += ["dataset_kwargs:", "  data_files:"]
    lines += [f"    {split}: {path}" for split, path in files.items()]
    (workdir / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


def lm_eval_items(
    model_dir: Path,
    ts,
    chat: bool,
    workdir: Path,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
) -> list[dict]:
    """lm-eval's per-item records (prompt, continuations, log-likelihoods) for ``ts``'s items."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from agiasi.shipped import jglue_file

    task = ts.task
    data = workdir / f"{task.name}-scored.json"
    with data.open("w", encoding="utf-8") as fh:
        for it in ts.items:
            fh.write(json.dumps(it, ensure_ascii=False) + "\n")
    pool = jglue_file(task.train_file) if (ts.num_fewshot and task.train_file) else None
    name = _lm_eval_task_dir(workdir, task, data, pool)
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype={dtype},device={device}",
        tasks=[name],
        num_fewshot=ts.num_fewshot,
        fewshot_random_seed=ts.seed,
        log_samples=True,
        task_manager=TaskManager(include_path=str(workdir)),
        batch_size=batch_size,
        apply_chat_template=chat,
        fewshot_as_multiturn=False,
        verbosity="ERROR",
    )
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    return [
        {
            "context": s["arguments"][0][0],
            "continuations": [a[1] for a in s["arguments"]],
            "logliks": [float(r[0]) for r in s["filtered_resps"]],
            "greedy": [bool(r[1]) for r in s["filtered_resps"]],
            "acc": float(s["acc"]),
        }
        for s in samples
    ]


def crosscheck(
    model_dir: Path, task_name: str, limit: int | None, num_fewshot: int = 0, chat: bool = False
) -> dict:
    """Both harnesses on the same items; the largest differences and the accuracies."""
    from agiasi.eval.benchmark import score_set
    from agiasi.eval.models import open_eval_model
    from agiasi.eval.tasks import TASKS, continuations, prepare

    ts = prepare(TASKS[task_name], num_fewshot=num_fewshot, limit=limit)
    if ts.fewshot_from and ts.task.train_file is None:
        raise SystemExit("the JNLI few-shot pool is carved from the valid set: lm-eval has none")
    model = open_eval_model(model_dir, device="cpu")
    t0 = time.perf_counter()
    ours = score_set(model, ts, chat)
    ours_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ref = lm_eval_items(model_dir, ts, chat, Path(tmp))
        ref_s = time.perf_counter() - t0
    assert len(ref) == len(ours["per_item"]), (len(ref), len(ours["per_item"]))
    worst_abs = worst_rel = 0.0
    prompt_diff, cont_diff, greedy_diff, pred_diff, beyond = [], [], [], [], []
    for i, (a, b, item) in enumerate(zip(ours["per_item"], ref, ts.items, strict=True)):
        conts = continuations(ts.task, item, chat)
        if a["context"] != b["context"]:
            prompt_diff.append(i)
        if conts != b["continuations"]:
            cont_diff.append(i)
        for x, y in zip(a["logliks"], b["logliks"], strict=True):
            d = abs(x - y)
            worst_abs = max(worst_abs, d)
            worst_rel = max(worst_rel, d / max(1.0, abs(y)))
            if d > ATOL + RTOL * abs(y):
                beyond.append(i)
        if a["greedy"] != b["greedy"]:
            greedy_diff.append(i)
        if (a["pred"] == a["gold"]) != bool(b["acc"]):
            pred_diff.append(i)
    acc_ref = sum(r["acc"] for r in ref) / len(ref)
    return {
        "task": task_name,
        "items": len(ref),
        "num_fewshot": num_fewshot,
        "chat_template": chat,
        "prompts_differ": prompt_diff,
        "continuations_differ": cont_diff,
        "logliks_beyond_tolerance": sorted(set(beyond)),
        "greedy_differ": greedy_diff,
        "outcome_differ": pred_diff,
        "max_abs_loglik_diff": worst_abs,
        "max_rel_loglik_diff": worst_rel,
        "acc_agiasi": ours["acc"],
        "acc_lm_eval": acc_ref,
        "seconds_agiasi": ours_s,
        "seconds_lm_eval": ref_s,
        "speed_ratio": ref_s / ours_s,
    }


def main() -> None:
    from agiasi.shipped import tiny_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(tiny_model_path()))
    ap.add_argument("--task", default="jcommonsenseqa,jnli")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--chat-template", action="store_true")
    ap.add_argument("--out", default=None, help="append the JSON rows to this file")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    for name in args.task.split(","):
        if args.num_fewshot and name == "jnli":
            print("jnli: skipped (no train split shipped for lm-eval's few-shot pool)")
            continue
        r = crosscheck(Path(args.model), name, args.limit, args.num_fewshot, args.chat_template)
        rows.append(r)
        print(json.dumps(r, ensure_ascii=False), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    bad = [r for r in rows if r["prompts_differ"] or r["logliks_beyond_tolerance"]]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
