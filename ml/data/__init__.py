"""Dataset registry: every source loads offline into the same `Dataset` record."""

from ml.data import cifar, digits, mnist1d, mnist5k, npz  # noqa: F401  (each registers itself)
from ml.data.augment import AUGMENTATIONS, augment_batch
from ml.data.base import (
    DATASETS,
    Dataset,
    DatasetInfo,
    dataset_infos,
    fingerprint_arrays,
    load_dataset,
)
from ml.data.npz import DataValidationError, NpzSummary, validate_npz

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DataValidationError",
    "Dataset",
    "DatasetInfo",
    "NpzSummary",
    "augment_batch",
    "dataset_infos",
    "fingerprint_arrays",
    "load_dataset",
    "validate_npz",
]
