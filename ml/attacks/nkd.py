"""Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation" (normalised KD).

The KD loss split into the target-class term and the normalised non-target distribution, the latter
weighted separately so its gradient does not vanish as the student grows confident.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ml.attacks.base import (
    Attack,
    LabelCEParams,
    drop_target,
    register,
    soft_ce,
    target_split,
    temper,
)


def nkd_loss(
    logits: Tensor, teacher: Tensor, targets: Tensor, T: float, gamma: float, ce_weight: float
) -> dict[str, Tensor]:
    """ce_w CE - mean_i p_t,gt log p_s,gt + gamma T^2 CE(N(p_t^T), N(p_s^T)), N = non-target renormalised."""
    log_s_gt, _, _ = target_split(logits, targets)
    _, _, log_n_s = target_split(logits / T, targets)
    p_t_gt = teacher.gather(-1, targets[:, None])
    return {
        "ce": ce_weight * F.cross_entropy(logits, targets),
        "target": -(p_t_gt * log_s_gt).mean(),
        "nontarget": gamma * T**2 * soft_ce(drop_target(temper(teacher, T), targets), log_n_s),
    }


class NKDParams(LabelCEParams):
    T: float = Field(3.0, gt=0, description="temperature of the non-target term")
    gamma: float = Field(3.5, ge=0, description="weight of the non-target term")


@register("nkd", NKDParams, nkd_loss, paper="Yang et al., ICCV 2023")
class NKD(Attack):
    row_separable = True
