"""CIFAR ResNets (He et al. 2016, BasicBlock) as defined in the CRD repository: resnet8..110, 8x4, 32x4."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from ml.models.base import classifier_head, conv_bn, init_cifar, register_model

MIN_SIZE = 32


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU; a 1x1 conv+BN projects a changed shape."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, relu=False))
        project = stride != 1 or cin != cout
        self.shortcut = conv_bn(cin, cout, 1, stride, relu=False) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def cifar_resnet(
    input_shape: tuple[int, ...], num_classes: int, depth: int, widths: tuple[int, ...]
) -> nn.Module:
    """Stem of widths[0], three stages of (depth - 2) / 6 blocks at widths[1:] (strides 1, 2, 2)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2; got {depth}")
    n = (depth - 2) // 6
    stages: list[tuple[str, nn.Module]] = [("stem", conv_bn(input_shape[0], widths[0], 3))]
    cin = widths[0]
    for i, width in enumerate(widths[1:]):
        blocks = []
        for j in range(n):
            blocks.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
            cin = width
        stages.append((f"layer{i + 1}", nn.Sequential(*blocks)))
    stages.append(("head", classifier_head(cin, num_classes)))
    return init_cifar(nn.Sequential(OrderedDict(stages)))


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", "2d", f"CIFAR ResNet-{_depth}, widths 16/32/64", MIN_SIZE)(
        partial(cifar_resnet, depth=_depth, widths=(16, 16, 32, 64))
    )
for _depth in (8, 32):
    register_model(f"resnet{_depth}x4", "2d", f"CIFAR ResNet-{_depth}x4, widths 64/128/256", MIN_SIZE)(
        partial(cifar_resnet, depth=_depth, widths=(32, 64, 128, 256))
    )
