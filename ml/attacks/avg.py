"""Class-average KD: distil the batch centroid of the teacher's answers for each label, not each answer.

What a thief can still learn if the per-sample answers carry noise but class centroids do not (the
centroid Q_y^T is the one in the CMI definition).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ml.attacks.base import Attack, AttackContext, distill_kl, register, temper
from ml.attacks.kd import KDParams


def class_means(p: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Row i -> mean of p over the batch rows labelled targets[i] (classes absent from the batch unused)."""
    onehot = F.one_hot(targets, num_classes).to(p.dtype)
    counts = onehot.sum(0).clamp_min(1)
    return (onehot.T @ p / counts[:, None])[targets]


def avg_loss(
    logits: Tensor, teacher: Tensor, targets: Tensor, T: float, a: float, num_classes: int
) -> dict[str, Tensor]:
    """(1-a) CE + a T^2 KL(Q_y^T || softmax(z_s / T)), Q_y^T = batch mean of temper(p_t, T) over label y."""
    target = class_means(temper(teacher, T), targets, num_classes)
    return {"ce": (1 - a) * F.cross_entropy(logits, targets), "kd": a * distill_kl(target, logits, T)}


@register(
    "avg", KDParams, avg_loss, paper="class-average KD (batch centroid of the served answers per label)"
)
class Avg(Attack):
    def hyper(self, ctx: AttackContext) -> dict[str, Any]:
        return dict(self.params) | {"num_classes": self.num_classes}
