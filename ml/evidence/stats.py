"""The evidence test: a suspect's agreement on a challenge set against that of independent models.

Null model: the agreements a_1..a_n of n independent models (students trained without the teacher:
same data, architecture family, other seeds) are a normal sample; a new independent model's agreement
a then follows mean + s * sqrt(1 + 1/n) * t_{n-1} (a prediction interval), so

    p = P(t_{n-1} >= (a - mean) / (s * sqrt(1 + 1/n)))

is the probability that an independent model agrees at least as much. s is floored at the binomial
std sqrt(m (1 - m) / M) of M challenge points, so a null of near-identical negatives cannot make any
small excess significant. Calling a suspect a copy when p < alpha bounds the false-positive rate at
alpha for suspects like the negatives; `loo_fpr` measures it on the negatives themselves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

ALPHA = 0.01  # a suspect is called a copy when p < ALPHA


@dataclass(frozen=True)
class NullModel:
    """Agreement of independent models on one challenge set: mean, std, how many, challenge size."""

    mean: float
    std: float
    n: int
    points: int

    @classmethod
    def fit(cls, agreements: list[float], points: int) -> NullModel:
        a = np.asarray(agreements, dtype=np.float64)
        if len(a) < 2:
            raise ValueError(f"the null needs at least 2 independent models, got {len(a)}")
        return cls(float(a.mean()), float(a.std(ddof=1)), len(a), points)

    def scale(self) -> float:
        m = min(max(self.mean, 0.0), 1.0)
        floor = math.sqrt(max(m * (1 - m), 1.0 / self.points) / self.points)
        return max(self.std, floor) * math.sqrt(1 + 1 / self.n)

    def p_value(self, agreement: float) -> float:
        """One-sided: the chance an independent model agrees at least this much."""
        return float(stats.t.sf((agreement - self.mean) / self.scale(), self.n - 1))

    def threshold(self, alpha: float = ALPHA) -> float:
        """The agreement above which a suspect is called a copy at level alpha."""
        return float(self.mean + self.scale() * stats.t.isf(alpha, self.n - 1))

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def loo_fpr(agreements: list[float], points: int, alpha: float = ALPHA) -> float | None:
    """Leave-one-out false-positive rate: each negative tested against a null fitted on the others
    (None for fewer than 3 negatives)."""
    if len(agreements) < 3:
        return None
    hits = [
        NullModel.fit(agreements[:i] + agreements[i + 1 :], points).p_value(a) < alpha
        for i, a in enumerate(agreements)
    ]
    return float(np.mean(hits))
