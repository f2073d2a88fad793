"""The checkpoint the service stores, serves and lets owners download: safetensors + JSON config.

Loading rebuilds the model from the allow-listed zoo and reads plain tensors; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ml.models import build_model

FORMAT_VERSION = 1
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "model.json"


class ModelMeta(BaseModel):
    """Everything needed to rebuild, serve and describe a trained model."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str]
    mean: list[float] | None = None
    std: list[float] | None = None
    # What the model answers: a zoo model gives logits; an ONNX model (arch "onnx") may give probabilities.
    output: Literal["logits", "probabilities"] = "logits"
    objective: str = "ce"
    objective_params: dict[str, Any] = Field(default_factory=dict)
    dataset: str = ""
    dataset_fingerprint: str = ""
    train_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


def build_from_meta(meta: ModelMeta) -> nn.Module:
    """A fresh (untrained) model of the architecture a checkpoint describes."""
    return build_model(meta.arch, tuple(meta.input_shape), meta.num_classes, mean=meta.mean, std=meta.std)


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(model: nn.Module, meta: ModelMeta, directory: str | Path) -> tuple[Path, Path]:
    """Write model.safetensors and model.json into directory; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(weights, lambda p: save_file(tensors, p, metadata={"format": "pt", "arch": meta.arch}))
    _atomic_write(config, lambda p: Path(p).write_text(meta.model_dump_json(indent=2)))
    return weights, config


def load_meta(config: str | Path) -> ModelMeta:
    """Read and validate a checkpoint's JSON config."""
    try:
        return ModelMeta.model_validate(json.loads(Path(config).read_text()))
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{config}: not a valid cmim model config: {e}") from None


def check_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise a one-line ValueError naming missing/unexpected keys and wrong shapes before loading state."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the architecture: missing keys [{', '.join(missing)}], "
            f"unexpected keys [{', '.join(unexpected)}]"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(f"weights do not match the architecture: wrong shapes: {'; '.join(wrong)}")


def read_weights(weights: str | Path) -> dict[str, torch.Tensor]:
    """Plain tensors from a .safetensors file (nothing unpickled); ValueError when it is not one."""
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{Path(weights).name}: not a valid safetensors file ({e})") from None


def load_checkpoint(weights: str | Path, config: str | Path | None = None) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model from its config and load its weights; returns (model in eval mode, meta)."""
    weights = Path(weights)
    config = Path(config) if config is not None else weights.with_name(CONFIG_NAME)
    if not weights.is_file():
        raise FileNotFoundError(f"no weights file at {weights}")
    if not config.is_file():
        raise FileNotFoundError(f"no model config next to the weights: expected {config}")
    meta = load_meta(config)
    model = build_from_meta(meta)
    state = read_weights(weights)
    check_state(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval(), meta
