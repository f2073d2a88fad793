"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": classic soft-target KD."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ml.attacks.base import Attack, AttackParams, register, tempered_kl


def kd_loss(logits: Tensor, teacher: Tensor, targets: Tensor, T: float, a: float) -> dict[str, Tensor]:
    """(1-a) CE(z_s, y) + a T^2 KL(temper(p_t, T) || softmax(z_s / T))."""
    return {"ce": (1 - a) * F.cross_entropy(logits, targets), "kd": a * tempered_kl(teacher, logits, T)}


class KDParams(AttackParams):
    """The Hinton weighting, shared by the attacks built on it (avg, topk, mkd, skeptical)."""

    T: float = Field(4.0, gt=0, description="temperature applied to both teacher and student")
    a: float = Field(0.9, ge=0, le=1, description="weight of the KD term; CE gets 1 - a")


@register("kd", KDParams, kd_loss, paper="Hinton, Vinyals & Dean 2015")
class KD(Attack):
    row_separable = True
    # SPEC: T swept over {1, 4, 10, 20}, each a separate audit row.
    sweep = tuple((f"kd_t{T}", {"T": float(T)}) for T in (1, 4, 10, 20))
