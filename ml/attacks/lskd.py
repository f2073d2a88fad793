"""Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation": KD on z-scored logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ml.attacks.base import Attack, LabelCEParams, distill_kl, register


def zscore(z: Tensor) -> Tensor:
    """Per-sample logit standardisation (z - mean_c z) / (std_c z + 1e-7), std with Bessel's correction."""
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)


def lskd_loss(
    logits: Tensor,
    teacher: Tensor,
    targets: Tensor,
    T: float,
    kd_weight: float,
    ce_weight: float,
    floor: float,
) -> dict[str, Tensor]:
    """ce_w CE + kd_w T^2 KL(softmax(zs(log max(p_t, floor)) / T) || softmax(zs(z_s) / T)), zs = z-score."""
    # The black box serves probabilities; their log is the teacher's logits up to a per-sample
    # constant, which the z-score removes. The floor stands in for log 0 of top-k / label answers.
    z_t = zscore(torch.log(teacher.clamp_min(floor)))
    target = torch.softmax(z_t / T, dim=-1)
    return {
        "ce": ce_weight * F.cross_entropy(logits, targets),
        "kd": kd_weight * distill_kl(target, zscore(logits), T),
    }


class LSKDParams(LabelCEParams):
    T: float = Field(2.0, gt=0, description="base temperature applied after standardisation")
    kd_weight: float = Field(9.0, ge=0, description="weight of the KD term")
    ce_weight: float = Field(0.1, ge=0, description="weight of CE with the attacker's labels")
    floor: float = Field(
        1e-8, gt=0, lt=1, description="probabilities are clamped to this before the log (exact zeros)"
    )


@register("lskd", LSKDParams, lskd_loss, paper="Sun et al., CVPR 2024")
class LSKD(Attack):
    row_separable = True
