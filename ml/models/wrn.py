"""Wide ResNets (Zagoruyko & Komodakis 2016) as defined in the CRD repository: WRN-depth-widen."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from ml.models.base import classifier_head, init_cifar, register_model

MIN_SIZE = 32


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class WideBlock(nn.Module):
    """Pre-activation BN-ReLU-conv-BN-ReLU-conv; a 1x1 conv of the activated input projects shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        project = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        # The reference projects the *activated* input, but adds the raw one when no projection is needed.
        return out + (x if self.shortcut is None else self.shortcut(a))


def wrn(input_shape: tuple[int, ...], num_classes: int, depth: int, widen: int) -> nn.Module:
    """WRN-depth-widen: stem 16, three stages of (depth - 4) / 6 blocks at 16k/32k/64k, final BN-ReLU."""
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n + 4; got {depth}")
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    stages: list[tuple[str, nn.Module]] = [("stem", _conv3x3(input_shape[0], 16))]
    cin = 16
    for i, width in enumerate(widths):
        blocks = []
        for j in range(n):
            blocks.append(WideBlock(cin, width, 2 if i > 0 and j == 0 else 1))
            cin = width
        stages.append((f"block{i + 1}", nn.Sequential(*blocks)))
    stages += [("bn", nn.BatchNorm2d(cin)), ("relu", nn.ReLU()), ("head", classifier_head(cin, num_classes))]
    return init_cifar(nn.Sequential(OrderedDict(stages)))


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_depth}_{_widen}", "2d", f"Wide ResNet-{_depth}-{_widen}", MIN_SIZE)(
        partial(wrn, depth=_depth, widen=_widen)
    )
