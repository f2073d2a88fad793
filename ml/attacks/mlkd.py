"""Jin et al., CVPR 2023, "Multi-level Logit Distillation": instance, batch and class alignment.

Implemented from the paper's objective: for every view (weak = the plain augmentation, strong = a
second, stronger one) and every temperature T of the prediction augmentation, align
  instance: T^2 KL(p_t^T || p_s^T) per sample,
  batch:    ||P_t P_t^T - P_s P_s^T||_F^2 / B   (B x B Gram of the predictions),
  class:    ||P_t^T P_t - P_s^T P_s||_F^2 / C   (C x C class correlation),
with P the (B, C) matrix of tempered predictions. The paper's confidence masking (dropping the more
confident half of the samples and classes from the weak-view terms) is not implemented: it is a
training heuristic tuned on CIFAR/ImageNet, and leaving it out keeps the attack fully specified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor

from ml.attacks.base import Attack, AttackContext, LabelCEParams, distill_kl, register, temper


def gram_gap(p_s: Tensor, p_t: Tensor, transpose: bool) -> Tensor:
    """||G_t - G_s||_F^2 / n with G = P P^T (B x B, n = B) or, transposed, P^T P (C x C, n = C)."""
    if transpose:
        p_s, p_t = p_s.T, p_t.T
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / p_s.shape[0]


def mlkd_loss(
    logits: list[Tensor],
    teacher: list[Tensor],
    targets: Tensor,
    temperatures: list[float],
    ce_weight: float,
    kd_weight: float,
) -> dict[str, Tensor]:
    """ce_w sum_v CE + kd_w sum_v,T [T^2 KL(p_t^T||p_s^T) + |G_t-G_s|^2/B + |M_t-M_s|^2/C], G=PP', M=P'P."""
    ce = sum(F.cross_entropy(z, targets) for z in logits)
    instance, batch, cls = (torch.zeros((), dtype=logits[0].dtype, device=logits[0].device) for _ in range(3))
    for z, p in zip(logits, teacher, strict=True):
        for T in temperatures:
            p_s, p_t = torch.softmax(z / T, dim=-1), temper(p, T)
            instance = instance + distill_kl(p_t, z, T)
            batch = batch + gram_gap(p_s, p_t, transpose=False)
            cls = cls + gram_gap(p_s, p_t, transpose=True)
    return {
        "ce": ce_weight * ce,
        "instance": kd_weight * instance,
        "batch": kd_weight * batch,
        "class": kd_weight * cls,
    }


class MLKDParams(LabelCEParams):
    temperatures: list[PositiveFloat] = Field(
        [2.0, 3.0, 4.0, 5.0, 6.0], min_length=1, description="prediction-augmentation temperatures"
    )
    ce_weight: float = Field(0.1, ge=0, description="weight of CE on each view")
    kd_weight: float = Field(0.9, ge=0, description="weight of every alignment term")


@register("mlkd", MLKDParams, paper="Jin et al., CVPR 2023")
class MLKD(Attack):
    views = ("plain", "strong")
    params: MLKDParams

    def forward(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], targets: Tensor, ctx: AttackContext
    ) -> dict[str, Tensor]:
        p = self.params
        # Both views are augmentations of the same labelled images, so CE uses the same targets.
        return mlkd_loss(
            [student[v] for v in self.views],
            [teacher[v] for v in self.views],
            targets,
            p.temperatures,
            p.ce_weight,
            p.kd_weight,
        )
