"""Fingerprint: mixes of two training inputs of different classes on which the teacher hesitates.

No serving change. A candidate is lam * x_a + (1 - lam) * x_b with y_a != y_b and lam ~ U(0.2, 0.8),
pairs and lam drawn from the secret; the challenge keeps the `points` candidates with the smallest
teacher margin (top-1 minus top-2 probability): there the teacher's label is its own idiosyncrasy,
which a knockoff that learnt from the teacher's answers on mixed queries copies and an independent
model agrees with only by chance (Lukas et al. 2021 and SAC, 2022, use such points; ours are chosen
by margin alone, without reference models).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ml.cmi import model_logits
from ml.data import Dataset
from ml.evidence.base import Challenge, seeded
from ml.evidence.secret import Secret

CANDIDATES_PER_POINT = 16
LAM_RANGE = (0.2, 0.8)


class Fingerprint:
    name, serving = "fingerprint", False

    def challenge(
        self, teacher: nn.Module, policy: Any, data: Dataset, secret: Secret, points: int
    ) -> Challenge | None:
        g = seeded(secret.derive(self.name))
        n = points * CANDIDATES_PER_POINT
        a = torch.randint(len(data.x_train), (n,), generator=g)
        b = torch.randint(len(data.x_train), (n,), generator=g)
        keep = data.y_train[a] != data.y_train[b]
        a, b = a[keep], b[keep]
        lo, hi = LAM_RANGE
        lam = lo + (hi - lo) * torch.rand(len(a), generator=g)
        lam = lam.reshape(-1, *([1] * (data.x_train.dim() - 1)))
        x = lam * data.x_train[a] + (1 - lam) * data.x_train[b]
        probs = torch.softmax(model_logits(teacher, x), -1)
        top2 = probs.topk(2, dim=-1).values
        chosen = (top2[:, 0] - top2[:, 1]).argsort()[:points]
        return Challenge(x[chosen].contiguous(), probs[chosen].argmax(-1))
