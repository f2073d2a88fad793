"""1-D CNNs for sequence inputs (C, L): the mnist1d benchmark teacher and its small student."""

from __future__ import annotations

from functools import partial

from torch import nn

from ml.models.base import register_model


def _out_len(length: int, kernel: int, stride: int, pad: int) -> int:
    return (length + 2 * pad - kernel) // stride + 1


def cnn1d_net(
    input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, int, int], hidden: int
) -> nn.Module:
    """Conv k5 -> conv k3/2 -> conv k3/2 (ReLU), flatten -> hidden -> classes; no BatchNorm (vmap-safe)."""
    channels, length = input_shape
    c1, c2, c3 = widths
    for kernel, stride, pad in ((5, 1, 2), (3, 2, 1), (3, 2, 1)):
        length = _out_len(length, kernel, stride, pad)
    return nn.Sequential(
        nn.Conv1d(channels, c1, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(c1, c2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(c2, c3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c3 * length, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


register_model("cnn1d", "1d", "1-D CNN teacher: convs 32/64/128, hidden 64 (113,738 params on mnist1d)")(
    partial(cnn1d_net, widths=(32, 64, 128), hidden=64)
)
register_model("cnn1d_small", "1d", "1-D CNN student: convs 8/16/32, hidden 32 (12,618 params on mnist1d)")(
    partial(cnn1d_net, widths=(8, 16, 32), hidden=32)
)
