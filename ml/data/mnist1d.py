"""MNIST-1D: 1-D digit signals generated locally by the `mnist1d` package (its downloader is never used)."""

from __future__ import annotations

import functools
import random

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ml.data.base import Splits, register_dataset


class Mnist1dParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_train: int = Field(4000, gt=0, le=1_000_000)
    num_test: int = Field(1000, gt=0, le=1_000_000)
    seed: int = Field(42, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _whole_classes(self) -> Mnist1dParams:
        # make_dataset draws num_samples // 10 per class; other totals would silently lose samples.
        if (self.num_train + self.num_test) % 10:
            raise ValueError("num_train + num_test must be a multiple of 10 (the generator balances classes)")
        return self


@functools.lru_cache(maxsize=8)
def _generate(num_train: int, num_test: int, seed: int) -> tuple[np.ndarray, ...]:
    """Generated (x_train, y_train, x_test, y_test), cached in-process (14k samples take ~2.5 s)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_train + num_test
    args.train_split = num_train / (num_train + num_test)
    args.seed = seed
    # make_dataset reseeds the process-global `random` and numpy RNGs; restore them for our callers.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    # Re-split at exactly num_train: int(n * train_split) can round one sample the wrong way.
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    arrays = (x[:num_train], y[:num_train], x[num_train:], y[num_train:])
    for a in arrays:
        a.flags.writeable = False  # shared by every caller through the cache
    return arrays


@register_dataset(
    "mnist1d",
    description="MNIST-1D (Greydanus 2020): 40-sample 1-D digit signals, generated locally, 10 classes",
    params=Mnist1dParams,
    input_shape=(1, 40),
    num_classes=10,
)
def load_mnist1d(p: Mnist1dParams) -> Splits:
    """Generate MNIST-1D with the package's default transforms; already standardised (mean 0, std 1)."""
    x_train, y_train, x_test, y_test = (a.copy() for a in _generate(p.num_train, p.num_test, p.seed))
    return Splits(
        x_train=x_train[:, None, :],
        y_train=y_train,
        x_test=x_test[:, None, :],
        y_test=y_test,
        class_names=[str(i) for i in range(10)],
        augmentation="shift_noise",
        mean=[0.0],
        std=[1.0],
    )
