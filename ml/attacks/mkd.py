"""Yang & Ye, ECCV 2024, "Markov Knowledge Distillation": distil the teacher through a learned channel.

The tempered teacher distribution is mapped through a row-stochastic C x C Markov matrix M before
it becomes the KD target; M is learned jointly with the student on the same loss, so the attacker
can undo a systematic distortion of the served probabilities (e.g. a nasty teacher's misleading
non-target mass) while keeping what is consistent with the student. M = row-softmax(U V^T + diag(d))
with U, V of rank `rank`: C + 2 C rank parameters instead of C^2. Initialisation: V = 0 (so the
initial M is exactly the diagonal one and deterministic), U small random, d such that every row
starts with `init_diag` of its mass on the diagonal, i.e. MKD starts close to plain KD.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ml.attacks.base import Attack, AttackContext, distill_kl, register, temper
from ml.attacks.kd import KDParams


def markov_matrix(u: Tensor, v: Tensor, d: Tensor) -> Tensor:
    """Row-stochastic M = softmax_rows(U V^T + diag(d))."""
    return torch.softmax(u @ v.T + torch.diag(d), dim=-1)


def mkd_loss(
    logits: Tensor, teacher: Tensor, targets: Tensor, matrix: Tensor, T: float, a: float
) -> dict[str, Tensor]:
    """(1-a) CE + a T^2 KL(temper(p_t, T) M || softmax(z_s / T)), M row-stochastic (learned)."""
    target = temper(teacher, T) @ matrix
    return {"ce": (1 - a) * F.cross_entropy(logits, targets), "kd": a * distill_kl(target, logits, T)}


class MKDParams(KDParams):
    rank: int = Field(3, ge=1, description="rank of the low-rank part of the matrix logits")
    init_diag: float = Field(0.9, gt=0, lt=1, description="initial diagonal mass of every row of M")
    init_scale: float = Field(0.01, ge=0, description="std of the random initial U")


@register("mkd", MKDParams, mkd_loss, paper="Yang & Ye, ECCV 2024")
class MKD(Attack):
    params: MKDParams

    def build(self) -> None:
        p, c = self.params, self.num_classes
        self.u = nn.Parameter(torch.randn(c, p.rank) * p.init_scale)
        self.v = nn.Parameter(torch.zeros(c, p.rank))
        # softmax row with logit d on the diagonal and 0 elsewhere: e^d / (e^d + C - 1) = init_diag.
        self.d = nn.Parameter(torch.full((c,), math.log(p.init_diag * (c - 1) / (1 - p.init_diag))))

    def matrix(self) -> Tensor:
        """The current Markov matrix M (C x C, rows sum to 1)."""
        return markov_matrix(self.u, self.v, self.d)

    def hyper(self, ctx: AttackContext) -> dict[str, Any]:
        return {"matrix": self.matrix(), "T": self.params.T, "a": self.params.a}
