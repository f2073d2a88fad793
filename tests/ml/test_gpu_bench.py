"""bench/gpu.py runs on the CPU too (tiny sizes), and every epoch event says where it trained."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ml.train import TrainConfig, train_model

GPU_BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():  # noqa: ANN201 - the bench/gpu.py module
    spec = importlib.util.spec_from_file_location("gpu_bench", GPU_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_part_measures_both_loops(gpu_bench) -> None:  # noqa: ANN001
    out = gpu_bench.trainer("resnet8", 128, 64, epochs=2, batch=64, device="cpu")
    assert out["device"] == "cpu"
    assert out["trainer_images_per_s"] > 0 and out["plain_images_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["trainer_images_per_s"] / out["plain_images_per_s"])


def test_lockstep_part_counts_student_epochs(gpu_bench) -> None:  # noqa: ANN001
    out = gpu_bench.lockstep("resnet8", "resnet8", 2, 128, 64, epochs=1, device="cpu")
    assert out["students"] == 2 and out["seconds"] > 0
    assert out["student_epochs_per_s"] == pytest.approx(2 / out["seconds"])


def test_epoch_reports_name_the_device(gpu_bench) -> None:  # noqa: ANN001
    data = gpu_bench.random_images(64, 32, classes=4)
    cfg = TrainConfig(dataset="cifar10", arch="mlp", objective="ce", epochs=2, batch_size=32, device="cpu")
    result = train_model(cfg, data)
    assert [h.device for h in result.history] == ["cpu", "cpu"]


def test_onnx_part_serves_an_exported_model_as_pytorch_answers(gpu_bench) -> None:  # noqa: ANN001
    out = gpu_bench.onnx_serving(batch=16, repeats=2)
    assert out["session_providers"][0] in out["available_providers"]
    assert out["onnx_rows_per_s"] > 0 and out["torch_rows_per_s"] > 0
