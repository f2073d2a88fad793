"""Statistics over seeds: mean and standard error, Welch's one-sided test, Holm's adjustment, and the
seeds a gain needs to pass the test."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def summarise(values: list[float]) -> dict[str, Any]:
    """mean, std (ddof 1), standard error and the values."""
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if len(a) > 1 else float("nan")
    return {
        "mean": float(a.mean()),
        "std": std,
        "se": std / math.sqrt(len(a)) if len(a) > 1 else float("nan"),
        "values": a.tolist(),
    }


def welch_one_sided(a: list[float], b: list[float]) -> float:
    """p-value of H1: mean(a) > mean(b), Welch's unequal-variance t test; nan with < 2 samples."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff = float(np.mean(a) - np.mean(b))
    if va + vb == 0:
        return 0.0 if diff > 0 else 1.0
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va and vb else len(a) + len(b) - 2
    return float(stats.t.sf(t, df))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); nan stays nan."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    out, running = [float("nan")] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def seeds_to_resolve(margin: float, std_a: float, std_b: float, level: float, most: int = 100) -> int | None:
    """The fewest seeds n (at most `most`) at which a gain `margin` of a over b, with these per-seed
    standard deviations, would pass the one-sided Welch test at `level`:
    t_{1-level, 2n-2} * sqrt((std_a^2 + std_b^2) / n) <= margin. None: no gain, or not within `most`."""
    from scipy import stats

    if not (margin > 0 and math.isfinite(std_a) and math.isfinite(std_b)):
        return None
    var = std_a**2 + std_b**2
    for n in range(2, most + 1):
        if stats.t.ppf(1 - level, 2 * n - 2) * math.sqrt(var / n) <= margin:
            return n
    return None


def row_stats(
    acc_best: list[float], acc_last: list[float], fidelity: list[float], queries: int
) -> dict[str, Any]:
    row = {"acc_best": summarise(acc_best), "acc_last": summarise(acc_last), "queries": queries}
    if not all(math.isnan(f) for f in fidelity):
        row["fidelity"] = summarise(fidelity)
    return row
