"""Selected: a challenge chosen on the owner's model, where knockoffs follow it and independent models do not.

The fingerprint's third-class mixes are an idiosyncrasy of some teachers (a CNN on mnist1d); on a spiral
or other tabular data a mix between two classes is simply the data, and independent models agree with
the teacher on nearly all of it. This mechanism lets the audit's own students choose:

1. **Candidates, drawn from the secret** (so they are committed before any suspect exists): a pool of
   `POOL_PER_POINT` x points inputs in three kinds, a third each: *mixes* lam x_a + (1 - lam) x_b of two
   training inputs of different classes (lam ~ U(0.2, 0.8)), *perturbations* x + sigma * std * noise of
   one training input (sigma ~ U(0.1, 1)) and *boundary points* (a mix moved by bisection onto the
   teacher's decision boundary between its labels of x_a and x_b, nudged to the x_a side). Every
   candidate carries the teacher's label.
2. **Selected on one half of the students**: the audit asks every student the whole pool; on the seeds
   of even index (0, 2, ...) a candidate's score is the share of the knockoffs that follow the teacher
   (unlimited queries; those agreeing with it on the pool more than independent models do: a copy made
   from labels on clean inputs looks independent and would only blur the choice) giving the teacher's
   label, minus the largest share of independent models of any one recipe (an LS row, a null family)
   doing so: the test's families (plain, mixup) pool recipes that differ (an LS student trained like
   the teacher agrees with it most), so the choice avoids every recipe. The challenge keeps
   the candidates of positive score, best first, at most `points`.
3. **Measured on the other half** (seeds 1, 3, ...): their independent models' agreements on the kept
   candidates are the null (per family, the worst p, as every mechanism), their knockoffs the detection
   rates. Neither was used to choose the points, so the rates are not fitted to themselves. The split is
   by seed because the students of one seed share their initialisation and data order.

Which kind of candidate discriminates is decided by this evidence, per model: the report counts the
kept points of each kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ml.cmi import model_logits
from ml.data import Dataset
from ml.evidence.base import Challenge, seeded
from ml.evidence.secret import Secret

POOL_PER_POINT = 4  # candidates per challenge point
KINDS = ("mix", "perturbation", "boundary")
LAM_RANGE = (0.2, 0.8)
SIGMA_RANGE = (0.1, 1.0)
BISECTION_STEPS = 8
NUDGE = 0.02  # boundary points sit this share of the a-b distance on the x_a side of the boundary
MIN_POINTS = 32  # fewer kept candidates than this: no challenge discriminates


class Selected:
    """The candidate pool (`challenge` returns all of it, in kind order); the audit selects from it."""

    name, serving, selects = "selected", False, True

    def challenge(
        self, teacher: nn.Module, policy: Any, data: Dataset, secret: Secret, points: int
    ) -> Challenge | None:
        g = seeded(secret.derive(self.name))
        n = points * POOL_PER_POINT // len(KINDS)
        x_train, y_train = data.x_train, data.y_train
        shape = [1] * (x_train.dim() - 1)
        a, b = _pairs(y_train, n, g)
        lo, hi = LAM_RANGE
        lam = (lo + (hi - lo) * torch.rand(n, generator=g)).reshape(-1, *shape)
        mixes = lam * x_train[a] + (1 - lam) * x_train[b]
        i = torch.randint(len(x_train), (n,), generator=g)
        lo, hi = SIGMA_RANGE
        sigma = (lo + (hi - lo) * torch.rand(n, generator=g)).reshape(-1, *shape)
        std = torch.tensor(data.std).reshape(-1, *([1] * (x_train.dim() - 2)))
        perturbed = x_train[i] + sigma * std * torch.randn(x_train[i].shape, generator=g)
        a, b = _pairs(y_train, n, g)
        boundary = _boundary(teacher, x_train[a], x_train[b])
        x = torch.cat([mixes, perturbed, boundary]).contiguous()
        return Challenge(x, model_logits(teacher, x).argmax(-1))


def pool_size(points: int) -> int:
    """The candidates a challenge of `points` is chosen from."""
    return points * POOL_PER_POINT // len(KINDS) * len(KINDS)


def pool_kinds(pool: int) -> list[str]:
    """The kind of each candidate of a pool of `pool` (the order `Selected.challenge` builds)."""
    per = pool // len(KINDS)
    return [k for k in KINDS for _ in range(per)]


def _pairs(y: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """n index pairs of training inputs of different classes (drawn with room, trimmed to n)."""
    a = torch.randint(len(y), (4 * n,), generator=g)
    b = torch.randint(len(y), (4 * n,), generator=g)
    keep = y[a] != y[b]
    if int(keep.sum()) < n:  # a single class: pairs of any classes
        keep = torch.ones_like(keep)
    return a[keep][:n], b[keep][:n]


def _boundary(teacher: nn.Module, xa: Tensor, xb: Tensor) -> Tensor:
    """Points on the teacher's boundary between its labels of xa and xb (bisection along the segment)."""
    la = model_logits(teacher, xa).argmax(-1)
    lo, hi = torch.zeros(len(xa)), torch.ones(len(xa))  # t: share of xb; label(lo) == la
    shape = (-1, *([1] * (xa.dim() - 1)))
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        same = model_logits(teacher, (1 - mid).reshape(shape) * xa + mid.reshape(shape) * xb).argmax(-1) == la
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    t = (lo - NUDGE).clamp_min(0).reshape(shape)
    return (1 - t) * xa + t * xb


# --- the agreement bits a task records for the pool, and the selection the assembly makes ---


def pack_bits(agrees: Tensor) -> str:
    """A student's per-candidate agreement with the teacher's labels, as hex (one bit per candidate)."""
    return np.packbits(agrees.cpu().numpy().astype(bool)).tobytes().hex()


def unpack_bits(hexed: str, pool: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8))[:pool].astype(bool)


def select(
    knockoffs: list[np.ndarray], negatives: dict[str, list[np.ndarray]], points: int
) -> tuple[np.ndarray, np.ndarray]:
    """(kept candidate indices, best first; every candidate's score) from the selection half's bits: the
    knockoffs that follow the teacher (agree with it on the pool more than every recipe of independent
    models does on average; all of them when none does) against the most agreeing recipe, per candidate."""
    per_family = [np.mean(v, axis=0) for v in negatives.values()]
    ceiling = max(float(f.mean()) for f in per_family)
    following = [k for k in knockoffs if k.mean() > ceiling] or knockoffs
    follow = np.mean(following, axis=0)
    independent = np.max(per_family, axis=0)
    score = follow - independent
    order = np.argsort(-score, kind="stable")
    return order[score[order] > 0][:points], score
