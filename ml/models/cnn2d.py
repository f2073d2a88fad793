"""A small 2-D CNN for low-resolution digits (8x8 digits, 28x28 mnist5k)."""

from __future__ import annotations

from torch import nn

from ml.models.base import register_model


@register_model("cnn2d", "2d", "Small 2-D CNN: convs 32/64/64 (two stride 2), 2x2 avg pool; images >= 8x8", 8)
def cnn2d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Conv 32 -> conv 64/2 -> conv 64/2 (ReLU) -> adaptive 2x2 average pool -> linear; no BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        # A fixed 2x2 grid keeps some layout and makes the head independent of the input size.
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4, num_classes),
    )
