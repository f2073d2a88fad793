"""KD on the teacher's top-k probabilities only, renormalised (what a top-k endpoint would leak)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from ml.attacks.base import Attack, AttackContext, register
from ml.attacks.kd import KDParams, kd_loss
from ml.output_mode import topk_renormalise


def topk_loss(
    logits: Tensor, teacher: Tensor, targets: Tensor, k: int, T: float, a: float
) -> dict[str, Tensor]:
    """(1-a) CE + a T^2 KL(temper(topk_k(p_t), T) || softmax(z_s / T)), topk_k = top k kept, renormalised."""
    return kd_loss(logits, topk_renormalise(teacher, k), targets, T, a)


def default_k(num_classes: int) -> int:
    """k = 5, or C / 10 from 50 classes on (at most C)."""
    return min(num_classes, max(5, num_classes // 10))


class TopKParams(KDParams):
    k: int | None = Field(None, ge=1, description="classes kept; None: 5, or C/10 when C >= 50")


@register("topk", TopKParams, topk_loss, paper="KD on the renormalised top-k teacher probabilities")
class TopK(Attack):
    row_separable = True
    params: TopKParams

    def build(self) -> None:
        self.k = default_k(self.num_classes) if self.params.k is None else self.params.k
        if self.k > self.num_classes:
            raise ValueError(f"topk: k = {self.k} exceeds the {self.num_classes} classes")

    def hyper(self, ctx: AttackContext) -> dict[str, Any]:
        return dict(self.params) | {"k": self.k}
