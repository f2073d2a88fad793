"""The evidence test: a suspect's agreement on a challenge set against that of independent models.

Null model, per family of independent models (students trained without the teacher, same data and
architecture, other seeds; a family is one training recipe, e.g. plain or mixup): the agreements
a_1..a_n of a family are a normal sample; a new independent model of that family agrees
mean + s * sqrt(1 + 1/n) * t_{n-1} (a prediction interval), so

    p_F = P(t_{n-1} >= (a - mean) / (s * sqrt(1 + 1/n)))

is the chance that it agrees at least as much, and the test's p is the largest p_F over the families:
a suspect must out-agree every kind of independent model (families differ a lot: on our benchmark,
plain LS students agree about 0.5 with the teacher's challenge labels, mixup ones about 0.2, and one
pooled normal would fit neither). s is floored at the binomial std sqrt(m (1 - m) / M) of M challenge
points. Calling a suspect a copy when p < alpha bounds the false-positive rate at alpha for suspects
like the negatives; `loo_fpr` measures it on the negatives themselves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.01  # a suspect is called a copy when p < ALPHA
# In a widest null, a family enters with at least this many models: a prediction interval from fewer is so
# wide (t with 2 degrees of freedom: 8 stds at alpha 0.01) that one small, erratic family of another
# architecture would leave no test. A smaller family is tested against the null, its rate reported.
MIN_FAMILY = 5
NEAR_LS_POINTS = 1.0  # "near LS": a knockoff within this many points of the best LS student, or above


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


@dataclass(frozen=True)
class Null:
    """The null of several families of independent models: p and threshold are the worst over them."""

    families: dict[str, NullModel]

    @classmethod
    def fit(cls, by_family: dict[str, list[float]], points: int) -> Null:
        """Families with at least 2 models; ValueError when none has."""
        fams = {f: NullModel.fit(a, points) for f, a in by_family.items() if len(a) >= 2}
        if not fams:
            raise ValueError("the null needs a family of at least 2 independent models")
        return cls(fams)

    def p_value(self, agreement: float) -> float:
        return max(f.p_value(agreement) for f in self.families.values())

    def threshold(self, alpha: float = ALPHA) -> float:
        return max(f.threshold(alpha) for f in self.families.values())

    def to_json(self) -> dict[str, dict[str, float | int]]:
        return {f: n.to_json() for f, n in self.families.items()}


def loo_fpr(by_family: dict[str, list[float]], points: int, alpha: float = ALPHA) -> float | None:
    """Leave-one-out false-positive rate: each negative tested against the null of the others
    (None when a negative left out would leave no family of 2)."""
    hits = []
    for f, values in by_family.items():
        for i, a in enumerate(values):
            rest = by_family | {f: values[:i] + values[i + 1 :]}
            try:
                hits.append(Null.fit(rest, points).p_value(a) < alpha)
            except ValueError:
                return None
    return float(np.mean(hits)) if hits else None


def members(by_family: dict[str, list[float]], min_n: int = MIN_FAMILY) -> dict[str, list[float]]:
    """The families of at least `min_n` models: those a widest null is fitted on."""
    return {f: v for f, v in by_family.items() if len(v) >= min_n}


def loo_hits(
    by_family: dict[str, list[float]], points: int, alpha: float = ALPHA, min_n: int = 2
) -> dict[str, list[bool]]:
    """Per family, whether each negative is called a copy against the null of all the others (the families
    of at least `min_n`, its own without it; a family left with one model drops out). A family below
    `min_n` is tested against that null whole. A negative whose removal leaves no family of 2 is not
    tested."""
    fitted = members(by_family, min_n)
    out: dict[str, list[bool]] = {}
    for f, values in by_family.items():
        hits = out.setdefault(f, [])
        for i, a in enumerate(values):
            rest = fitted | {f: values[:i] + values[i + 1 :]} if f in fitted else fitted
            try:
                null = Null.fit(rest, points)
            except ValueError:
                continue
            hits.append(null.p_value(a) < alpha)
    return out


def fpr_by_family(
    by_family: dict[str, list[float]], points: int, min_n: int = 2
) -> tuple[float | None, dict[str, float | None]]:
    """(the false-positive rate over every negative, and per family) by `loo_hits`; None: none tested."""
    hits = loo_hits(by_family, points, min_n=min_n)
    every = [h for v in hits.values() for h in v]
    per = {f: float(np.mean(v)) if v else None for f, v in hits.items()}
    return (float(np.mean(every)) if every else None), per


def rates(rows: dict[str, Any]) -> dict[str, Any]:
    """TPR over every knockoff of a phase, and over the near-LS ones (with how many there are)."""
    hits = [q < ALPHA for r in rows.values() for q in r["p"]]
    near = [q < ALPHA for r in rows.values() for q, n in zip(r["p"], r["near_ls"], strict=True) if n]
    return {"tpr": float(np.mean(hits)), "tpr_near_ls": float(np.mean(near)) if near else None,
            "near_ls": len(near), "knockoffs": len(hits)}  # fmt: skip
