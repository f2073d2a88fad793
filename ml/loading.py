"""One loader for every stored model: a zoo checkpoint (safetensors + JSON config) or an ONNX black box.

Whoever holds the objects (the service's artifact store, or anything with `read_bytes(key)` and
`local_path(key)`) loads a model the same way: a job's trained or uploaded teacher, its CE control, an
owner's uploaded model, a suspect checked for evidence. An ONNX model is validated against the input
shape and class count it must answer for when they are given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn

from ml.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelMeta,
    build_from_meta,
    check_state,
    load_checkpoint,
    load_meta,
    read_weights,
)
from ml.onnx_model import ONNX_ARCH, ONNX_NAME, load_onnx

# The model-loading entry point of the service (`app/` imports these from here): the loader, the files a
# model is published as, and the checks an uploaded model passes before it is stored.
__all__ = [
    "CONFIG_NAME", "ONNX_ARCH", "ONNX_NAME", "WEIGHTS_NAME", "ModelMeta", "ObjectSource", "build_from_meta",
    "check_state", "load_meta", "load_model", "load_onnx", "read_weights",
]  # fmt: skip


class ObjectSource(Protocol):
    """Where stored objects are read from, by key (`app.core.storage.ArtifactStore` is one)."""

    def read_bytes(self, key: str) -> bytes: ...

    def local_path(self, key: str) -> Path: ...


def load_model(
    source: ObjectSource,
    weights: str,
    config: str | None = None,
    *,
    onnx_output: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, ModelMeta | None]:
    """The model stored under `weights` (and its `config`), with its metadata when it has a config.

    ONNX when `onnx_output` names its output (an uploaded ONNX model: its row says so) or when its
    config says so (a job's published ONNX teacher); a zoo checkpoint otherwise."""
    meta = None
    if onnx_output is None and config is not None:
        meta = ModelMeta.model_validate_json(source.read_bytes(config))
        onnx_output = meta.output if meta.arch == ONNX_ARCH else None
    if onnx_output is not None:
        model, _ = load_onnx(source.read_bytes(weights), onnx_output, input_shape, num_classes)  # type: ignore[arg-type]
        return model, meta
    if config is None:
        raise ValueError(f"a zoo checkpoint needs its config: {weights} has none")
    return load_checkpoint(source.local_path(weights), source.local_path(config))
