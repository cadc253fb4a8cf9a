"""α annealing (the note's ``linear_annealing``)."""

from __future__ import annotations

from agiasi.soul import PHI


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
