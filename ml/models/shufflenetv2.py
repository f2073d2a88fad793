"""ShuffleNetV2 1x (Ma et al. 2018) as defined in the CRD repository (CIFAR stem, no max pool)."""

from __future__ import annotations

import torch
from torch import nn

from ml.models.base import classifier_head, conv_bn, init_cifar, register_model

MIN_SIZE = 32

STAGE_CHANNELS, STAGE_UNITS, LAST_CHANNELS = (116, 232, 464), (3, 7, 3), 1024


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave channels across groups so the two branches mix in the next unit."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    """1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU: the right branch of both unit types."""
    return nn.Sequential(
        conv_bn(cin, cout, 1), conv_bn(cout, cout, 3, stride, groups=cout, relu=False), conv_bn(cout, cout, 1)
    )


class ShuffleUnit(nn.Module):
    """Stride 1: split channels, transform one half. Stride 2: transform the whole input on both branches."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        if stride == 1 and cin != cout:
            raise ValueError("a stride-1 ShuffleNetV2 unit keeps its channel count")
        self.left = (
            None
            if stride == 1
            else nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, relu=False), conv_bn(cin, half, 1))
        )
        self.right = _branch(half if stride == 1 else cin, half, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left is None:
            kept, x = x.chunk(2, dim=1)
            return channel_shuffle(torch.cat([kept, self.right(x)], 1))
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


@register_model("shufflenetv2", "2d", "ShuffleNetV2 1x (CRD ShuffleV2: 116/232/464 channels)", MIN_SIZE)
def shufflenetv2(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Stem conv 3x3 to 24, three stages (a stride-2 unit plus 3/7/3 units), 1x1 conv to 1024, linear."""
    cin = 24
    layers: list[nn.Module] = [conv_bn(input_shape[0], cin, 3)]
    for cout, units in zip(STAGE_CHANNELS, STAGE_UNITS, strict=True):
        layers.append(ShuffleUnit(cin, cout, 2))
        layers += [ShuffleUnit(cout, cout, 1) for _ in range(units)]
        cin = cout
    layers.append(conv_bn(cin, LAST_CHANNELS, 1))
    return init_cifar(nn.Sequential(*layers, classifier_head(LAST_CHANNELS, num_classes)))
