"""Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher" (DIST): match relations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ml.attacks.base import Attack, LabelCEParams, register, temper

_EPS = 1e-8


def pearson_distance(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """mean of 1 - Pearson correlation between a and b along `dim` (a constant vector correlates 0)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    # Clamp before the square root: a zero-variance teacher column (label-only answers) must give a
    # zero gradient, not 0 * inf.
    norm = torch.sqrt(((a * a).sum(dim) * (b * b).sum(dim)).clamp_min(_EPS**2))
    return (1 - (a * b).sum(dim) / norm).mean()


def dist_loss(
    logits: Tensor, teacher: Tensor, targets: Tensor, tau: float, beta: float, gamma: float, ce_weight: float
) -> dict[str, Tensor]:
    """ce_w CE + tau^2 [beta mean_i (1 - rho(p_s,i., p_t,i.)) + gamma mean_c (1 - rho(p_s,.c, p_t,.c))]."""
    p_s = torch.softmax(logits / tau, dim=-1)
    p_t = temper(teacher, tau)
    return {
        "ce": ce_weight * F.cross_entropy(logits, targets),
        "inter": beta * tau**2 * pearson_distance(p_s, p_t, dim=1),
        "intra": gamma * tau**2 * pearson_distance(p_s, p_t, dim=0),
    }


class DISTParams(LabelCEParams):
    tau: float = Field(4.0, gt=0, description="temperature")
    beta: float = Field(1.0, ge=0, description="inter-class relation weight (per sample, over classes)")
    gamma: float = Field(1.0, ge=0, description="intra-class relation weight (per class, over the batch)")


@register("dist", DISTParams, dist_loss, paper="Huang et al., NeurIPS 2022")
class DIST(Attack):
    """Not row-separable: the intra-class relation correlates each class's answers over the batch."""
