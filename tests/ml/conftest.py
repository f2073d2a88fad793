"""Shared audit fixtures: a small mnist1d split and two small CE teachers trained on it."""

import pytest

from ml.data import load_dataset
from ml.train import TrainConfig, train_model

SMALL = {"num_train": 300, "num_test": 200}


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist1d", **SMALL)


@pytest.fixture(scope="module")
def teachers(data):
    def teacher(seed: int):
        cfg = TrainConfig(
            dataset_params=SMALL, arch="cnn1d_small", objective="ce", epochs=3, seed=seed, device="cpu"
        )
        return train_model(cfg, data).model

    return teacher(0), teacher(1)
