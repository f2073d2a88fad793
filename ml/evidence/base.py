"""What every evidence mechanism provides: a challenge set built from the teacher and the secret."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ml.data import Dataset
from ml.evidence.secret import Secret


@dataclass
class Challenge:
    """Inputs to ask a suspect, and the labels a copy of the served teacher would give (kept secret)."""

    x: Tensor  # (M, *input_shape), raw inputs as the model takes them
    labels: Tensor  # (M,) int64

    def agreement(self, predicted: Tensor) -> float:
        """Share of the challenge on which the suspect's predicted labels equal the copy's labels."""
        if predicted.shape != self.labels.shape:
            raise ValueError(f"expected {tuple(self.labels.shape)} labels, got {tuple(predicted.shape)}")
        return float((predicted.cpu() == self.labels.cpu()).double().mean())


class Mechanism(Protocol):
    """An evidence mechanism: `serving` says whether it changes what the API answers."""

    name: str
    serving: bool

    def challenge(
        self, teacher: nn.Module, policy: Any, data: Dataset, secret: Secret, points: int
    ) -> Challenge | None:
        """The challenge for a teacher served through `policy` (None: this box carries no such evidence)."""
        ...


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
