"""Kundu et al., NeurIPS 2021, "Analyzing the Confidentiality of Undistillable Teachers" (skeptical student).

The student never matches the (possibly nasty) teacher with its final head: teacher KD goes only into
a shallow auxiliary head, and the final head learns from the labels and from the auxiliary head by
self-distillation. Simplification: the paper attaches auxiliary heads to intermediate blocks of the
student; the audit engine only exposes the input of the student's last layer (penultimate
features), so here one auxiliary MLP (D -> D -> C) sits on those features. The teacher's gradient
still reaches the student's body through the auxiliary head; the final linear layer sees only CE and
the detached auxiliary predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.attacks.base import Attack, AttackContext, distill_kl, register, tempered_kl
from ml.attacks.kd import KDParams


def skeptical_loss(
    logits: Tensor, aux_logits: Tensor, teacher: Tensor, targets: Tensor, T: float, a: float
) -> dict[str, Tensor]:
    """(1-a) [CE(z) + CE(h)] + a T^2 [KL(sg softmax(h/T) || softmax(z/T)) + KL(p_t^T || softmax(h/T))]."""
    self_target = torch.softmax(aux_logits.detach() / T, dim=-1)
    return {
        "ce": (1 - a) * F.cross_entropy(logits, targets),
        "self_kd": a * distill_kl(self_target, logits, T),
        "aux_ce": (1 - a) * F.cross_entropy(aux_logits, targets),
        "aux_kd": a * tempered_kl(teacher, aux_logits, T),
    }


@register("skeptical", KDParams, paper="Kundu et al., NeurIPS 2021")
class Skeptical(Attack):
    needs_features = True
    params: KDParams

    def build(self) -> None:
        self.aux: nn.Module | None = None  # created by setup, once the student's feature size is known

    def setup(self, feature_dim: int) -> None:
        """Create the auxiliary head for D = feature_dim (before collecting parameters or moving devices)."""
        self.aux = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, self.num_classes)
        )

    def forward(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], targets: Tensor, ctx: AttackContext
    ) -> dict[str, Tensor]:
        if self.aux is None:
            raise RuntimeError("skeptical: call setup(feature_dim) before training")
        p = self.params
        aux_logits = self.aux(student["features"])
        return skeptical_loss(student["plain"], aux_logits, teacher["plain"], targets, p.T, p.a)
