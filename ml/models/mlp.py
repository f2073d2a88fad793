"""Multi-layer perceptron: works on any input shape by flattening it."""

from __future__ import annotations

import math

from torch import nn

from ml.models.base import register_model


@register_model("mlp", "any", "MLP on the flattened input: two hidden layers of 128, ReLU")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten -> 128 -> 128 -> classes (40-128-128-10 = 23,050 parameters on mnist1d)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )
