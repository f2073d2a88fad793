"""The model zoo: every architecture by name, wrapped so that a saved model takes raw inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

# Importing each family registers its builders.
from ml.models import cnn1d, cnn2d, mlp, mobilenetv2, resnet, shufflenetv2, vgg, wrn  # noqa: F401
from ml.models.base import MODELS, ModelInfo, Normalize, count_parameters, model_infos


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """`Sequential(Normalize(mean, std), net)`; the net maps (B, *input_shape) to logits (B, num_classes)."""
    builder = MODELS.get(name)
    shape = tuple(int(d) for d in input_shape)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1; got {num_classes}")
    normalize = Normalize(mean, std)
    if normalize.channels not in (None, 1) and shape and normalize.channels != shape[0]:
        raise ValueError(f"mean/std give {normalize.channels} channels; input shape {shape} has {shape[0]}")
    return nn.Sequential(normalize, builder(shape, num_classes))


__all__ = ["MODELS", "ModelInfo", "Normalize", "build_model", "count_parameters", "model_infos"]
