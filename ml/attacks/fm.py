"""Beyer et al., CVPR 2022, "A good teacher is patient and consistent": function matching.

The student and the black box see the same mixup of two augmented inputs, and the student matches
the teacher's tempered answer there, with no label term: the queries leave the data manifold, which
is where a protection trained on clean data is least constrained. Under label-only serving the
tempered one-hot answer stays one-hot, so this copies the teacher's labels on mixed inputs.

Two adaptive variants query where an off-manifold detector looks least: `fm_edge` mixes
with ratios near 1 (each query stays close to one real input; the audit's `edge_range`), `fm_noise`
adds Gaussian noise to a real input instead of mixing (the audit's `noise_scale`). Their default
temperature is 1: they are aimed at protected (label-only, snapped, refusing) teachers, where T 1
copies labels best.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from ml.attacks.base import Attack, AttackContext, AttackParams, register, tempered_kl


def fm_loss(logits: Tensor, teacher: Tensor, T: float) -> dict[str, Tensor]:
    """T^2 KL(temper(p_t, T) || softmax(z_s / T)) on the mixup view; no CE."""
    return {"kd": tempered_kl(teacher, logits, T)}


class FMParams(AttackParams):
    T: float = Field(4.0, gt=0, description="temperature (T 4 beat T 1 in our calibration)")


class FunctionMatching(Attack):
    """fm and its adaptive variants: the student matches the tempered answers on `views[0]`, no CE."""

    row_separable = True
    params: FMParams

    def forward(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], targets: Tensor, ctx: AttackContext
    ) -> dict[str, Tensor]:
        view = self.views[0]
        return fm_loss(student[view], teacher[view], self.params.T)


@register("fm", FMParams, paper="Beyer et al., CVPR 2022")
class FM(FunctionMatching):
    views = ("mixup",)
    # T 4 copies soft answers best; on one-hot (label-only) or snapped answers T^2 KL at T 4 is a
    # weakened CE (gradient 4 (softmax(z/4) - y)), and plain CE on the labels (T 1) copies them better:
    # an honest audit keeps both rows (they share the mixup queries).
    sweep = (("fm", {}), ("fm_t1", {"T": 1.0}))


class FMAdaptiveParams(FMParams):
    T: float = Field(1.0, gt=0, description="temperature (T 1 copies one-hot answers best)")


@register(
    "fm_edge",
    FMAdaptiveParams,
    paper="adaptive fm: mixing ratios near 1, built to pass off-manifold detectors",
)
class FMEdge(FunctionMatching):
    views = ("mixup_edge",)


@register(
    "fm_noise",
    FMAdaptiveParams,
    paper="adaptive fm: Gaussian-noise queries around real inputs instead of mixup",
)
class FMNoise(FunctionMatching):
    views = ("noise",)
