"""Japanese ability as the field measures it: JGLUE multiple choice on any model agiasi opens
(a step folder, an HF folder, a GGUF), and before/after with an interval and a verdict.

``agiasi eval MODEL --task jcommonsenseqa,jnli`` scores each item's choices by log-likelihood
(:mod:`agiasi.eval.loglik`, lm-eval's rules) on lm-eval's prompts (:mod:`agiasi.eval.tasks`) and reports
``acc`` (the most likely choice) and ``acc_norm`` (log-likelihood per character of the choice,
lm-eval's normalisation). ``--compare A,B,…`` scores every model on the same items, one model in
memory at a time, and compares each with the first (:mod:`agiasi.eval.stats`). ``agiasi export
--benchmark`` puts the same rows, for the wrapper, the HF folder and every GGUF, in the export
report (:func:`export_rows`).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agiasi.errors import AgiasiError
from agiasi.eval.tasks import TEMPLATE_SOURCE, TaskSet, chat_messages, continuations, plain_prompt

EXPORT_DEFAULT_ITEMS = 100


def prepare_sets(cfg) -> list[TaskSet]:
    """The items every model of this run is scored on, checked before any model loads."""
    from agiasi.eval.tasks import parse_task_paths, parse_tasks, prepare

    tasks = parse_tasks(cfg.task)
    data = parse_task_paths(cfg.task_data, tasks, "--task-data")
    pools = parse_task_paths(cfg.fewshot_data, tasks, "--fewshot-data")
    return [
        prepare(
            t,
            data=data.get(t.name),
            fewshot_data=pools.get(t.name),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            seed=cfg.fewshot_seed,
        )
        for t in tasks
    ]


def eval_inputs(cfg) -> dict[str, str | None]:
    """Every file or folder ``agiasi eval --task`` reads, by what it is (for the output check)."""
    inputs: dict[str, str | None] = {"the model": cfg.model, "the base model": cfg.base_model}
    for i, m in enumerate((cfg.compare or "").split(","), start=1):
        inputs[f"compared model {i}"] = m.strip() or None
    for flag, value in (("--task-data", cfg.task_data), ("--fewshot-data", cfg.fewshot_data)):
        for j, part in enumerate((value or "").split(","), start=1):
            inputs[f"the {flag} file {j}"] = part.partition("=")[2] or part.strip() or None
    return inputs


def score_set(model, ts: TaskSet, chat: bool, log=None) -> dict[str, Any]:
    """One model on one task: per-item outcomes and the two accuracies."""
    if chat and model.chat is None:
        raise AgiasiError(f"--chat-template: {model.path} has no chat template")
    contexts = [
        model.chat(chat_messages(ts.task, it, sh)) if chat else plain_prompt(ts.task, it, sh)
        for it, sh in zip(ts.items, ts.shots, strict=True)
    ]
    scored, cut, seconds = _score_items(model, ts, contexts, chat)
    items = [
        _item_record(model, ts, i, s, ctx, c)
        for i, (s, ctx, c) in enumerate(zip(scored, contexts, cut, strict=True))
    ]
    acc = np.array([it["pred"] == it["gold"] for it in items], dtype=np.float64)
    acc_norm = np.array([it["pred_norm"] == it["gold"] for it in items], dtype=np.float64)
    n = len(items)
    result = {
        "items": n,
        "acc": float(acc.mean()),
        "acc_stderr": float(acc.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "acc_norm": float(acc_norm.mean()),
        "truncated": int(sum(cut)),
        "seconds": seconds,
        "items_per_s": n / seconds if seconds > 0 else None,
        "per_item": items,
    }
    if log:
        log(
            f"eval: {ts.task.name} on {model.path}: acc {result['acc']:.1%}, acc_norm "
            f"{result['acc_norm']:.1%} ({n} items, {seconds:.1f} s)"
        )
    return result


def _score_items(model, ts: TaskSet, contexts: list[str], chat: bool):
    """Every item's choices through the model's scorer: ([Scored], [cut?], seconds)."""
    from agiasi.eval.loglik import Scored, item_tokens

    encoded = [
        item_tokens(model.encode, ctx, continuations(ts.task, it, chat), model.context)
        for ctx, it in zip(contexts, ts.items, strict=True)
    ]
    groups = [g for item_groups, _ in encoded for g in item_groups]
    t0 = time.perf_counter()
    bar = _progress(len(groups), f"{ts.task.name} {Path(model.path).name}")
    try:
        flat = model.scorer.score(groups, bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - t0
    scored, k = [], 0
    for item_groups, _ in encoded:  # an item cut per choice comes back as one group a choice
        parts = flat[k : k + len(item_groups)]
        k += len(item_groups)
        scored.append(
            Scored([v for p in parts for v in p.logliks], [g for p in parts for g in p.greedy])
        )
    return scored, [cut for _, cut in encoded], seconds


def _item_record(model, ts: TaskSet, i: int, s, context: str, cut: bool) -> dict[str, Any]:
    item = ts.items[i]
    if not all(math.isfinite(v) for v in s.logliks):
        raise AgiasiError(
            f"{model.path}: a log-likelihood of {ts.task.name} item {ts.item_id(i)} is not "
            "finite (the model's outputs are nan/inf)"
        )
    lengths = np.array([len(c) for c in ts.task.choices(item)], dtype=np.float64)
    ll = np.array(s.logliks)
    return {
        "id": ts.item_id(i),
        "gold": ts.task.gold(item),
        "choices": list(ts.task.choices(item)),
        "pred": int(np.argmax(ll)),
        "pred_norm": int(np.argmax(ll / lengths)),
        "logliks": s.logliks,
        "greedy": s.greedy,
        "truncated": cut,
        "context": context,
    }


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False, disable=None)


def set_record(ts: TaskSet, chat: bool) -> dict[str, Any]:
    return {
        "task": ts.task.name,
        "lm_eval_task": ts.task.lm_eval,
        "template": TEMPLATE_SOURCE,
        "items": len(ts.items),
        "scored_from": ts.scored_from,
        "num_fewshot": ts.num_fewshot,
        "fewshot_from": ts.fewshot_from,
        "fewshot_seed": ts.seed,
        "chat_template": chat,
        "chance": ts.task.chance,
        "majority": majority_rate(ts),
    }


def majority_rate(ts: TaskSet) -> float:
    """The accuracy of always answering the most frequent gold choice of these items: JNLI's
    "neutral" is 55.5 % of its validation set, so a model stuck on one answer scores that."""
    from collections import Counter

    golds = Counter(ts.task.gold(it) for it in ts.items)
    return max(golds.values()) / len(ts.items)


def compare_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model's accuracy against the first's on the same items."""
    from agiasi.eval.stats import mcnemar_exact, paired_bootstrap, verdict

    ref = np.array([it["pred"] == it["gold"] for it in results[0]["per_item"]])
    rows = []
    for r in results[1:]:
        got = np.array([it["pred"] == it["gold"] for it in r["per_item"]])
        diff, lo, hi = paired_bootstrap(ref, got)
        only_ref, only_new, p = mcnemar_exact(ref, got)
        rows.append(
            {
                "diff": diff,
                "ci95": [lo, hi],
                "verdict": verdict(diff, lo, hi),
                "mcnemar": {"only_reference": only_ref, "only_this": only_new, "p": p},
                "same_choice": float(
                    np.mean(
                        [
                            a["pred"] == b["pred"]
                            for a, b in zip(results[0]["per_item"], r["per_item"], strict=True)
                        ]
                    )
                ),
            }
        )
    return rows


def run_benchmark(cfg, log=None) -> dict[str, Any]:
    """``agiasi eval --task``: every model of ``cfg`` (MODEL, or the list of ``--compare``) on
    every task; one model loaded at a time."""
    from agiasi.eval.models import model_kind, open_eval_model

    if cfg.compare:
        if cfg.model:
            raise AgiasiError("give the models either as MODEL or in --compare, not both")
        models = [m.strip() for m in cfg.compare.split(",") if m.strip()]
        if len(models) < 2:
            raise AgiasiError("--compare needs two models or more: BASE,CHECKPOINT[,GGUF…]")
    elif cfg.model:
        models = [cfg.model]
    else:
        raise AgiasiError("name a MODEL (or --compare A,B,…) to evaluate")
    for m in models:
        model_kind(m)  # a missing model is an error before anything runs
    sets = prepare_sets(cfg)
    openers = [
        lambda p=path: open_eval_model(
            p,
            base_model=cfg.base_model,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            n_ctx=cfg.n_ctx,
            device=cfg.device,
        )
        for path in models
    ]
    per_model = one_at_a_time(
        openers,
        lambda m, _: {ts.task.name: score_set(m, ts, cfg.chat_template, log) for ts in sets},
    )
    report: dict[str, Any] = {"models": models, "tasks": {}}
    for ts in sets:
        name = ts.task.name
        results = [pm[name] for pm in per_model]
        entry = set_record(ts, cfg.chat_template)
        entry["results"] = [{"model": m, **r} for m, r in zip(models, results, strict=True)]
        if len(models) > 1:
            entry["compare"] = [
                {"model": m, **row}
                for m, row in zip(models[1:], compare_rows(results), strict=True)
            ]
        report["tasks"][name] = entry
    return report


def one_at_a_time(openers: list[Any], work) -> list[Any]:
    """``work(model, i)`` for each opened model in turn; each is closed and its memory given
    back before the next opens, so a comparison costs one model's memory."""
    from agiasi.model.loading import release_memory

    out = []
    for i, opener in enumerate(openers):
        model = opener()
        try:
            out.append(work(model, i))
        finally:
            model.close()
            del model
            release_memory()
    return out


def without_items(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-item records (what ``--json`` prints; ``--report`` keeps
    them)."""
    out = {"models": report["models"], "tasks": {}}
    for name, entry in report["tasks"].items():
        e = dict(entry)
        e["results"] = [{k: v for k, v in r.items() if k != "per_item"} for r in entry["results"]]
        out["tasks"][name] = e
    return out


def format_benchmark(report: dict[str, Any]) -> str:
    """The table ``agiasi eval --task`` prints."""
    lines = []
    for name, e in report["tasks"].items():
        shots = f"{e['num_fewshot']}-shot"
        prompt = "chat template" if e["chat_template"] else "plain prompt"
        lines.append(
            f"{name}: {e['items']} items, {shots}, {prompt} ({e['lm_eval_task']}); "
            f"chance {e['chance']:.1%}, majority answer {e['majority']:.1%}"
        )
        width = max(len(r["model"]) for r in e["results"])
        head = f"  {'model':<{width}}  {'acc':>6}  {'acc_norm':>8}"
        if "compare" in e:
            head += "  Δacc vs first  95 % CI          verdict"
        lines.append(head)
        cmp = {c["model"]: c for c in e.get("compare", [])}
        for k, r in enumerate(e["results"]):
            row = f"  {r['model']:<{width}}  {r['acc']:>6.1%}  {r['acc_norm']:>8.1%}"
            c = cmp.get(r["model"]) if k else None
            if c:
                lo, hi = c["ci95"]
                row += (
                    f"  {c['diff'] * 100:>+10.1f} pt  [{lo * 100:+.1f}, {hi * 100:+.1f}]"
                    f"{'':<4}{c['verdict']}"
                )
            lines.append(row)
        cut = max(r["truncated"] for r in e["results"])
        if cut:
            lines.append(f"  {cut} item(s) cut on the left to fit a model's context")
    return "\n".join(lines)


def parse_export_spec(text: str) -> tuple[str, int]:
    """``jcommonsenseqa[:N]`` → (task, N items)."""
    from agiasi.eval.tasks import parse_tasks

    name, sep, n = text.partition(":")
    task = parse_tasks(name)
    if len(task) != 1:
        raise AgiasiError("--benchmark takes one task: jcommonsenseqa[:N] or jnli[:N]")
    if not sep:
        return task[0].name, EXPORT_DEFAULT_ITEMS
    try:
        items = int(n)
    except ValueError:
        raise AgiasiError(f"--benchmark {text!r}: N must be a whole number of items") from None
    if items < 1:
        raise AgiasiError(f"--benchmark {text!r}: N must be at least 1")
    return task[0].name, items


def export_rows(
    spec: str,
    stages: list[tuple[str, Any]],
    log=None,
) -> dict[str, Any]:
    """The benchmark rows of an export: ``stages`` is [(row name, opener)], the first the
    reference (the trained wrapper); each opener returns an opened model, which is closed and
    freed before the next opens."""
    from agiasi.eval.tasks import TASKS, prepare

    name, n = parse_export_spec(spec)
    ts = prepare(TASKS[name], limit=n)
    names = [row for row, _ in stages]

    def score(model, i: int) -> dict[str, Any]:
        r = score_set(model, ts, False)
        if log:  # as each row finishes: the export's progress
            log(f"export: {name} on {names[i]}: acc {r['acc']:.1%} ({r['items']} items)")
        return r

    results = one_at_a_time([opener for _, opener in stages], score)
    rows = {names[0]: _export_row(results[0])}
    for row, r, c in zip(names[1:], results[1:], compare_rows(results), strict=True):
        rows[row] = {**_export_row(r), **c}
    return {**set_record(ts, False), "rows": rows}


def _export_row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("acc", "acc_norm", "seconds")}
