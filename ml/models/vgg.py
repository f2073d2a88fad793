"""VGG with BatchNorm as defined in the CRD repository: five conv stages and a single linear classifier."""

from __future__ import annotations

from functools import partial

from torch import nn

from ml.models.base import classifier_head, init_cifar, register_model

MIN_SIZE = 32

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


def vgg(input_shape: tuple[int, ...], num_classes: int, stages: list[list[int]]) -> nn.Module:
    """Stages of conv3x3(+bias)-BN-ReLU with 2x2 max pools after the first three, then pool and linear."""
    layers: list[nn.Module] = []
    cin = input_shape[0]
    # CRD pools after stage 3 only for 64-pixel inputs, so a 32x32 image reaches the last two stages at 4x4.
    pooled = (0, 1, 2, 3) if min(input_shape[1:]) >= 64 else (0, 1, 2)
    for i, widths in enumerate(stages):
        for width in widths:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            cin = width
        if i in pooled:
            layers.append(nn.MaxPool2d(2))
    return init_cifar(nn.Sequential(*layers, classifier_head(cin, num_classes)))


for _name, _stages in CONFIGS.items():
    _about = f"VGG-{_name[3:]} with BatchNorm ({sum(map(len, _stages))} convs, one linear layer)"
    register_model(_name, "2d", _about, MIN_SIZE)(partial(vgg, stages=_stages))
