"""Shared pieces of the model zoo: the registry, input checks, input normalisation and BN conv blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ml.registry import Registry

Kind = Literal["any", "1d", "2d"]
Builder = Callable[[tuple[int, ...], int], nn.Module]

MODELS: Registry[Builder] = Registry("model")


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to know to offer a model: its name, a one-line description and input kind."""

    name: str
    description: str
    kind: Kind  # "any": flattened (mlp); "1d": (C, L); "2d": (C, H, W)


_INFOS: dict[str, ModelInfo] = {}


def model_infos() -> list[ModelInfo]:
    """Every registered model, in registration order."""
    return [_INFOS[name] for name in MODELS]


def check_input_shape(name: str, kind: Kind, shape: tuple[int, ...], min_size: int = 1) -> None:
    """Raise ValueError, naming the model, when `shape` (one example, no batch axis) cannot feed it."""
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"model {name!r} needs a non-empty input shape of positive sizes; got {shape}")
    if kind == "1d" and len(shape) != 2:
        raise ValueError(f"model {name!r} needs sequence inputs (C, L); got input shape {shape}")
    if kind == "2d":
        if len(shape) != 3:
            raise ValueError(f"model {name!r} needs image inputs (C, H, W); got input shape {shape}")
        if min(shape[1:]) < min_size:
            raise ValueError(
                f"model {name!r} needs images of at least {min_size}x{min_size}; got input shape {shape}"
            )


def register_model(
    name: str, kind: Kind, description: str, min_size: int = 1
) -> Callable[[Builder], Builder]:
    """Register a builder `(input_shape, num_classes) -> net`; the stored builder checks the shape first."""

    def deco(fn: Builder) -> Builder:
        def checked(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
            shape = tuple(int(d) for d in input_shape)
            check_input_shape(name, kind, shape, min_size)
            return fn(shape, num_classes)

        MODELS.register(name)(checked)
        _INFOS[name] = ModelInfo(name, description, kind)
        return fn

    return deco


class Normalize(nn.Module):
    """(x - mean) / std per channel (axis 1), so a saved model takes raw inputs; identity when both None."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.enabled = mean is not None or std is not None
        if not self.enabled:
            return
        m = torch.tensor([0.0] if mean is None else list(mean), dtype=torch.float32)
        s = torch.tensor([1.0] if std is None else list(std), dtype=torch.float32)
        if m.ndim != 1 or s.ndim != 1 or len(m) == 0 or len(s) == 0:
            raise ValueError("mean and std must be non-empty lists of per-channel floats")
        if len(m) != len(s) and 1 not in (len(m), len(s)):
            raise ValueError(f"mean has {len(m)} channels but std has {len(s)}")
        if not bool((s > 0).all()):
            raise ValueError("std must be positive")
        # Persistent buffers: the statistics travel inside the checkpoint with the weights.
        self.register_buffer("mean", m)
        self.register_buffer("std", s)

    @property
    def channels(self) -> int | None:
        """Channels the statistics cover (1 broadcasts to any); None when disabled."""
        return max(len(self.mean), len(self.std)) if self.enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        # x.dim() is static (under vmap too), so the view is not data-dependent control flow.
        view = (-1,) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(view)) / self.std.view(view)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}" if self.enabled else "identity"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Bias-free conv (same padding) + BatchNorm (+ ReLU): the unit every CIFAR-zoo family is built from."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def classifier_head(cin: int, num_classes: int) -> nn.Sequential:
    """Global average pool + linear; adaptive so inputs larger than 32x32 work unchanged."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def init_cifar(net: nn.Module) -> nn.Module:
    """He-normal (fan_out) convs, unit BN, zero biases: the initialisation of the CRD CIFAR zoo."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return net
