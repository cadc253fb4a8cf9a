"""The two schedules of a run, kept apart: α's annealing (the soul's gate) and the learning rate.

``linear_annealing`` is the design note's α schedule (``--warmup-steps``, ``--annealing-steps``).
``lr_factor`` scales the optimizer's learning rates (``--lr-scheduler``, ``--lr-warmup-steps`` /
``--lr-warmup-ratio``, ``--min-lr-ratio``): warm-up from 0, then constant, linear or cosine decay
to ``min_lr_ratio`` × the base rate at the last step. Both are pure functions of the 0-based step,
so a resumed run needs no scheduler state to continue bit for bit.

The LR formulas are transformers' (``get_scheduler`` with ``constant_with_warmup``, ``linear``,
``cosine_with_min_lr``; a linear decay to a floor is the same line lifted by the floor), so a run
here and a run in TRL / Axolotl / LLaMA-Factory with the same numbers see the same rates: step 0
of a warm-up trains at rate 0, as theirs does. Tested against transformers' own schedulers.
"""

from __future__ import annotations

import math

from agiasi.soul import PHI

LR_SCHEDULERS = ("constant", "linear", "cosine")


def linear_annealing(
    step: int, warmup: int, anneal_steps: int, start: float = -5.0, target: float = PHI
) -> float:
    """α at a 0-based optimizer step: ``start`` during warm-up, a straight line to ``target``
    over ``anneal_steps``, then ``target``."""
    if step < warmup:
        return float(start)
    if anneal_steps > 0 and step < warmup + anneal_steps:
        progress = (step - warmup) / anneal_steps
        return float(start + progress * (target - start))
    return float(target)


def lr_warmup_steps(total: int, steps: int | None, ratio: float | None) -> int:
    """Warm-up length from ``--lr-warmup-steps`` or ``--lr-warmup-ratio`` (ceil, as HF does)."""
    if steps is not None:
        return int(steps)
    return math.ceil(total * ratio) if ratio else 0


def lr_factor(step: int, scheduler: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at 0-based optimizer ``step`` of ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "linear":
        decay = max(0.0, 1.0 - progress)
    elif scheduler == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr scheduler {scheduler!r}")
    return min_ratio + (1.0 - min_ratio) * decay
