"""MobileNetV2 (Sandler et al. 2018) at width 0.5 as defined in the CRD repository ("mobile_half")."""

from __future__ import annotations

import torch
from torch import nn

from ml.models.base import classifier_head, conv_bn, init_cifar, register_model

MIN_SIZE = 32

# (expansion t, output channels c, repeats n, first stride s); the CIFAR version keeps stride 1 in stage 2.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise 3x3 -> linear 1x1, with identity residual when the shape is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        # CRD keeps the expansion conv even for t = 1 (torchvision drops it); we follow CRD.
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, cout, 1, relu=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


@register_model("mobilenetv2", "2d", "MobileNetV2, width 0.5 (CRD mobile_half)", MIN_SIZE)
def mobilenetv2(input_shape: tuple[int, ...], num_classes: int, width: float = 0.5) -> nn.Module:
    """Stem conv 3x3/2, seven inverted-residual stages, 1x1 conv to 1280, pool and linear."""
    cin = int(32 * width)
    layers: list[nn.Module] = [conv_bn(input_shape[0], cin, 3, 2)]
    for expand, channels, repeats, stride in SETTINGS:
        cout = int(channels * width)
        for i in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    last = int(1280 * width) if width > 1.0 else 1280
    return init_cifar(nn.Sequential(*layers, conv_bn(cin, last, 1), classifier_head(last, num_classes)))
