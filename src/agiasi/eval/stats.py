"""Is a difference in accuracy real? Paired statistics on per-item outcomes.

Two models scored on the same items give, per item, 1 (right) or 0 (wrong) for each. The
accuracy difference is the mean of ``b − a``; its 95 % interval comes from the paired bootstrap
(resample the *items* with replacement, 10 000 times, seed 0: the percentile interval), which
keeps the pairing — an item both get right or both get wrong adds no noise. McNemar's exact
test on the discordant items (right for one, wrong for the other) is given beside it.

The verdict reads the interval: it lies below 0 → "lost N points", above 0 → "gained N
points", it contains 0 → "kept" (no difference this test can see at this number of items; the
interval says how large a loss could hide in it).
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
_CHUNK = 500


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float, float]:
    """(mean(b − a), low, high) of the ``level`` percentile interval over item resamples."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty outcome vectors")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):  # chunks: items × resamples would not fit
        n = min(_CHUNK, resamples - start)
        idx = rng.integers(0, len(d), size=(n, len(d)))
        means[start : start + n] = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), float(lo), float(hi)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """(items only ``a`` got right, items only ``b`` got right, two-sided exact p-value)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


def verdict(diff: float, lo: float, hi: float) -> str:
    """One line a user can quote."""
    if hi < 0:
        return f"lost {-diff * 100:.1f} points"
    if lo > 0:
        return f"gained {diff * 100:.1f} points"
    return "kept"
