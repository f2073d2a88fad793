"""Label copying: train on the teacher's top-1 answers instead of soft targets."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ml.attacks.base import Attack, AttackContext, AttackParams, register


def hard_label_loss(logits: Tensor, teacher: Tensor) -> dict[str, Tensor]:
    """CE(z_s, argmax_c p_t,c): the attacker's own labels are not used."""
    return {"ce": F.cross_entropy(logits, teacher.argmax(-1))}


class HardLabelParams(AttackParams):
    """No hyper-parameters."""


@register("hard_label", HardLabelParams, paper="label copying (CE on the teacher's argmax)")
class HardLabel(Attack):
    row_separable = True

    def forward(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], targets: Tensor, ctx: AttackContext
    ) -> dict[str, Tensor]:
        return hard_label_loss(student["plain"], teacher["plain"])
