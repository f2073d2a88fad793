"""Li et al., AAAI 2023, "Curriculum Temperature for Knowledge Distillation": an adversarial temperature.

The temperature T = t_min + t_range * sigmoid(theta) is learned together with the student, but
theta passes through a gradient-reversal layer, so it ascends the KD loss (finds the hardest
temperature) while the student descends it. The reversal strength ramps linearly from 0 to 1 over
the first `ramp_epochs` epochs: easy first, harder later (the curriculum).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ml.attacks.base import Attack, AttackContext, LabelCEParams, register, tempered_kl


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """Identity forward; backward multiplies the gradient by -strength."""
    return _GradientReversal.apply(x, strength)


def ctkd_loss(
    logits: Tensor, teacher: Tensor, targets: Tensor, T: Tensor, ce_weight: float, kd_weight: float
) -> dict[str, Tensor]:
    """ce_w CE + kd_w T^2 KL(temper(p_t, T) || softmax(z_s / T)), T a (reversed-gradient) learned tensor."""
    return {
        "ce": ce_weight * F.cross_entropy(logits, targets),
        "kd": kd_weight * tempered_kl(teacher, logits, T),
    }


class CTKDParams(LabelCEParams):
    t_min: float = Field(1.0, gt=0, description="lowest temperature")
    t_range: float = Field(20.0, gt=0, description="T = t_min + t_range * sigmoid(theta)")
    theta_init: float = Field(1.0, description="initial theta (the paper's global temperature starts at 1)")
    ramp_epochs: int = Field(10, ge=1, description="epochs over which the reversal strength goes 0 -> 1")
    ce_weight: float = Field(0.1, ge=0, description="weight of CE with the attacker's labels")
    kd_weight: float = Field(0.9, ge=0, description="weight of the KD term")


@register("ctkd", CTKDParams, ctkd_loss, paper="Li et al., AAAI 2023")
class CTKD(Attack):
    params: CTKDParams

    def build(self) -> None:
        self.theta = nn.Parameter(torch.tensor(self.params.theta_init))

    def reversal_strength(self, ctx: AttackContext) -> float:
        """lambda = min(epoch / ramp_epochs, 1): no adversary in the first epoch, full strength later."""
        return min(ctx.epoch / self.params.ramp_epochs, 1.0)

    def temperature(self, theta: Tensor | None = None) -> Tensor:
        """T = t_min + t_range * sigmoid(theta)."""
        theta = self.theta if theta is None else theta
        return self.params.t_min + self.params.t_range * torch.sigmoid(theta)

    @property
    def current_temperature(self) -> float:
        """The temperature now, for logs."""
        with torch.no_grad():
            return float(self.temperature())

    def hyper(self, ctx: AttackContext) -> dict[str, Any]:
        T = self.temperature(reverse_gradient(self.theta, self.reversal_strength(ctx)))
        return {"T": T, "ce_weight": self.params.ce_weight, "kd_weight": self.params.kd_weight}
