"""Keyed answers: inside a secret slab of input space the API answers a secret other label.

A serving-time watermark after DAWN (Szyller et al. 2021), changed for attackers who never repeat a
query. DAWN flips the answer of a keyed-hash-chosen 0.5 % of exact inputs; a thief who queries fresh
mixed inputs every step sees each flipped input once and learns nothing it could be tested on. Here
the flipped answers form a region a student can learn from many queries: the slab
|<w, (x - mean) / std> - c| < h of a secret unit direction w, where the served probabilities are
rolled by a secret shift s in 1..C-1 (the label becomes (argmax + s) mod C). h is calibrated so a
`fraction` of clean inputs falls inside: that share of honest answers is altered (and is the cost).
To verify, the owner moves clean inputs onto the slab's centre and asks the suspect: a copy answers
the shifted label, an independent model almost never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ml.cmi import model_logits
from ml.data import Dataset
from ml.evidence.base import Challenge, seeded
from ml.evidence.secret import Secret

CENTRE_QUANTILES = (0.3, 0.7)  # the slab's centre sits at a secret quantile of clean projections


@dataclass
class KeyedRegion:
    """The secret slab and shift, fitted to clean inputs (the key: server-side only)."""

    direction: Tensor  # (D,) unit vector in standardised input space
    centre: float
    half_width: float
    shift: int
    mean: Tensor  # broadcastable to one input, per channel
    std: Tensor

    def project(self, x: Tensor) -> Tensor:
        z = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return z.reshape(len(x), -1) @ self.direction.to(x.device, z.dtype)

    def inside(self, x: Tensor) -> Tensor:
        """(B,) bool: the queries answered with the keyed label."""
        return (self.project(x) - self.centre).abs() < self.half_width

    def answer(self, probs: Tensor, x: Tensor) -> Tensor:
        """probs, rolled by the shift where x lies inside the slab."""
        return torch.where(self.inside(x)[:, None], probs.roll(self.shift, dims=-1), probs)

    def onto_centre(self, x: Tensor) -> Tensor:
        """x moved along the direction onto the slab's centre plane."""
        step = (self.centre - self.project(x))[:, None] * self.direction[None, :]
        return x + step.reshape(x.shape) * self.std

    def to_tensors(self) -> dict[str, Tensor]:
        params = torch.tensor([self.centre, self.half_width, float(self.shift)], dtype=torch.float64)
        return {"keyed_direction": self.direction, "keyed_params": params, "keyed_mean": self.mean,
                "keyed_std": self.std}  # fmt: skip

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> KeyedRegion:
        centre, half, shift = t["keyed_params"].tolist()
        return cls(t["keyed_direction"].float(), centre, half, int(shift), t["keyed_mean"], t["keyed_std"])


def fit_keyed(
    x_fit: Tensor, x_calib: Tensor, fraction: float, num_classes: int, secret: Secret
) -> KeyedRegion:
    """The slab and shift drawn from the secret (inputs standardised per channel with x_fit's statistics);
    the half-width puts `fraction` of x_calib inside."""
    g = seeded(secret.derive("keyed"))
    w = torch.randn(x_fit[0].numel(), generator=g, dtype=torch.float64).float()
    shift = int(torch.randint(1, num_classes, (1,), generator=g))
    q = CENTRE_QUANTILES[0] + (CENTRE_QUANTILES[1] - CENTRE_QUANTILES[0]) * float(torch.rand(1, generator=g))
    x_fit = x_fit.cpu().float()
    axes = [0, *range(2, x_fit.dim())]
    m, s = x_fit.mean(axes, keepdim=True)[0], x_fit.std(axes, keepdim=True)[0].clamp_min(1e-6)
    region = KeyedRegion(w / w.norm(), 0.0, 0.0, shift, m, s)
    region.centre = float(torch.quantile(region.project(x_fit).double(), q))
    dist = (region.project(x_calib.cpu()) - region.centre).abs().double()
    region.half_width = float(torch.quantile(dist, fraction))
    return region


class Keyed:
    name, serving = "keyed", True

    def challenge(
        self, teacher: nn.Module, policy: Any, data: Dataset, secret: Secret, points: int
    ) -> Challenge | None:
        region: KeyedRegion | None = getattr(policy, "keyed", None)
        if region is None:
            return None
        g = seeded(secret.derive(self.name + "/challenge"))
        pick = torch.randperm(len(data.x_train), generator=g)[:points]
        x = region.onto_centre(data.x_train[pick])
        labels = (model_logits(teacher, x).argmax(-1) + region.shift) % data.num_classes
        return Challenge(x.contiguous(), labels)
