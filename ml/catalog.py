"""What a job may ask for, as one entry point for the service: the data sets (built-in, and checking an
owner's npz), the architectures, objectives, attacks and presets, and the configs a job's spec is validated
with. `app/` imports the job-request vocabulary from here only."""

from __future__ import annotations

from ml.attacks import attack_infos
from ml.data import (
    DATASETS,
    DatasetInfo,
    DataValidationError,
    NpzSummary,
    dataset_infos,
    load_dataset,
    validate_npz,
)
from ml.data.augment import check_augmentation
from ml.data.npz import default_augmentation
from ml.models import model_infos
from ml.objectives import OBJECTIVES
from ml.presets import PRESETS, apply_preset, merge
from ml.registry import UnknownNameError
from ml.train import TrainConfig, fine_tune_defaults

__all__ = [
    "DATASETS", "OBJECTIVES", "PRESETS", "DataValidationError", "DatasetInfo", "NpzSummary", "TrainConfig",
    "UnknownNameError", "apply_preset", "attack_infos", "check_augmentation", "dataset_infos",
    "default_augmentation", "fine_tune_defaults", "load_dataset", "merge", "model_infos", "validate_npz",
]  # fmt: skip
