"""Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation": target and non-target KD weighted apart."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ml.attacks.base import (
    Attack,
    AttackContext,
    AttackParams,
    drop_target,
    kl_batchmean,
    register,
    target_split,
    temper,
)


def dkd_loss(
    logits: Tensor, teacher: Tensor, targets: Tensor, alpha: float, beta: float, T: float, weight: float
) -> dict[str, Tensor]:
    """CE + w T^2 [alpha KL(b_t || b_s) + beta KL(n_t || n_s)], b = (p_gt, 1 - p_gt), n = non-target, at T."""
    p_t = temper(teacher, T)
    p_t_gt = p_t.gather(-1, targets[:, None])
    # The rest mass as a sum of the other entries, never 1 - p_gt, which rounding can make negative.
    b_t = torch.cat([p_t_gt, p_t.sum(-1, keepdim=True) - p_t_gt], dim=-1)
    log_s_gt, log_s_rest, log_n_s = target_split(logits / T, targets)
    tckd = kl_batchmean(b_t, torch.cat([log_s_gt, log_s_rest], dim=-1))
    nckd = kl_batchmean(drop_target(p_t, targets), log_n_s)
    return {
        "ce": F.cross_entropy(logits, targets),
        "tckd": weight * alpha * T**2 * tckd,
        "nckd": weight * beta * T**2 * nckd,
    }


class DKDParams(AttackParams):
    alpha: float = Field(1.0, ge=0, description="weight of the target-class (binary) term")
    beta: float = Field(8.0, ge=0, description="weight of the non-target term")
    T: float = Field(4.0, gt=0, description="temperature")
    warmup: int = Field(20, ge=1, description="epochs over which the KD weight ramps linearly to 1")


@register("dkd", DKDParams, dkd_loss, paper="Zhao et al., CVPR 2022")
class DKD(Attack):
    row_separable = True
    params: DKDParams

    def hyper(self, ctx: AttackContext) -> dict[str, Any]:
        p = self.params
        # (epoch + 1) so that the first epoch already distils, as with the paper's 1-based epochs.
        weight = min((ctx.epoch + 1) / p.warmup, 1.0)
        return {"alpha": p.alpha, "beta": p.beta, "T": p.T, "weight": weight}
