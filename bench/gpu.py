"""GPU checks of `bench/gpu.sh`: the trainer against a plain PyTorch loop, a lockstep audit, and
`cmim serve` running a small job whose epochs report where they trained.

Each part prints its numbers and ends with one JSON line. Everything also runs on the CPU (with
`--small`), so the script is checked where no GPU is present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.attacks import ATTACKS
from ml.audit import AuditConfig, Run, train_lockstep
from ml.data.augment import crop_flip
from ml.data.base import Dataset, Splits, _assemble
from ml.models import build_model
from ml.oracle import Oracle
from ml.train import (
    TrainConfig,
    describe_device,
    make_optimizer,
    make_schedule,
    resolve_device,
    train_model,
)


def random_images(n_train: int, n_test: int, classes: int = 100, seed: int = 0) -> Dataset:
    """CIFAR-shaped random data (3x32x32, uint8-range values), labels uniform over `classes`."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_train + n_test, 3, 32, 32)).astype(np.float32) / 255
    y = rng.integers(0, classes, n_train + n_test)
    names = [f"c{i}" for i in range(classes)]
    splits = Splits(x[:n_train], y[:n_train], x[n_train:], y[n_train:], names, "crop_flip")
    return _assemble("random-images", {"seed": seed}, splits)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(cfg: TrainConfig, data: Dataset) -> list[float]:
    """The same model, optimiser, schedule, batch, augmentation and bf16 autocast, in a bare loop: the
    baseline for the trainer. Per epoch also one pass over the test split, as the trainer does."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, data.input_shape, data.num_classes, mean=data.mean, std=data.std).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test = data.x_test.to(device)
    steps = math.ceil(len(x_train) / cfg.batch_size)
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_schedule(opt, cfg, steps)
    loss_fn = nn.CrossEntropyLoss()
    seconds = []
    for _ in range(cfg.epochs):
        _sync(device)
        t0 = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x_train), device=device).split(cfg.batch_size):
            x = crop_flip(x_train[idx])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(x).float(), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode():
            for i in range(0, len(x_test), 1024):
                model(x_test[i : i + 1024])
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def trainer(arch: str, n_train: int, n_test: int, epochs: int, batch: int, device: str) -> dict[str, Any]:
    """Images per second of `train_model` against `plain_loop` (first epoch of each is warm-up)."""
    data = random_images(n_train, n_test)
    cfg = TrainConfig(
        dataset="cifar100", arch=arch, objective="ce", epochs=epochs, batch_size=batch, lr=1e-3, device=device
    )
    dev = resolve_device(device)
    train_model(cfg.model_copy(update={"epochs": 1}), data)  # cuDNN autotune, allocator
    result = train_model(cfg, data)
    ours = [h.seconds for h in result.history][1:]
    plain = plain_loop(cfg, data)[1:]
    ours_ips, plain_ips = n_train / float(np.median(ours)), n_train / float(np.median(plain))
    out = {
        "part": "trainer",
        "device": describe_device(dev),
        "arch": arch,
        "batch": batch,
        "images_per_epoch": n_train,
        "trainer_images_per_s": ours_ips,
        "plain_images_per_s": plain_ips,
        "ratio": ours_ips / plain_ips,
    }
    print(
        f"trainer ({arch}, batch {batch}, bf16 autocast on CUDA, channels_last, {out['device']}): "
        f"{ours_ips:,.0f} images/s; plain PyTorch loop {plain_ips:,.0f} images/s; ratio {out['ratio']:.3f}"
    )
    return out


def lockstep(
    arch: str, teacher_arch: str, students: int, n_train: int, n_test: int, epochs: int, device: str
) -> dict[str, Any]:
    """Student-epochs per second of `students` knockoffs of one teacher trained in lockstep."""
    data = random_images(n_train, n_test)
    dev = resolve_device(device)
    torch.manual_seed(0)
    teacher = build_model(teacher_arch, data.input_shape, data.num_classes, mean=data.mean, std=data.std)
    oracles = {"teacher": Oracle(teacher.to(dev))}
    keys = ["kd", "hard_label", "topk", "dkd", "nkd", "dist", "avg", "wttm"]
    keys = (keys * (students // len(keys) + 1))[:students]
    cfg = AuditConfig(epochs=epochs, seeds=1, control=False, attacks=["kd"], device=device, batch_size=64)

    def runs() -> list[Run]:
        return [
            Run(f"{k}{i}", arch, teacher="teacher", attack=ATTACKS.get(k)(data.num_classes, None))
            for i, k in enumerate(keys)
        ]

    train_lockstep(runs(), data, oracles, cfg.model_copy(update={"epochs": 1}), 0)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    train_lockstep(runs(), data, oracles, cfg, 0)
    _sync(dev)
    seconds = time.perf_counter() - t0
    out = {
        "part": "lockstep",
        "device": describe_device(dev),
        "students": students,
        "arch": arch,
        "teacher": teacher_arch,
        "epochs": epochs,
        "images_per_epoch": n_train,
        "seconds": seconds,
        "student_epochs_per_s": students * epochs / seconds,
    }
    print(
        f"lockstep audit: {students} {arch} students of a {teacher_arch} teacher, {epochs} epochs of "
        f"{n_train} images, batch 64 ({out['device']}): {seconds:.1f} s, "
        f"{out['student_epochs_per_s']:.2f} student-epochs/s"
    )
    return out


def onnx_serving(batch: int = 1024, repeats: int = 50) -> dict[str, Any]:
    """An owner's ONNX model as the service serves it (`ml.onnx_model.OnnxModule`): which onnxruntime
    provider it runs on, and rows per second against the same network in PyTorch on the same device."""
    import onnxruntime

    from ml.onnx_model import OnnxModule

    torch.manual_seed(0)
    layers = [nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 5)]
    net = nn.Sequential(*layers).eval()
    path = Path(tempfile.mkdtemp(prefix="cmim-onnx-")) / "model.onnx"
    batch_axis = ({0: "batch"},)
    torch.onnx.export(net, (torch.randn(2, 20),), str(path), dynamic_shapes=batch_axis, external_data=False)
    module = OnnxModule(path.read_bytes(), "logits")
    x = torch.randn(batch, 20)
    with torch.inference_mode():
        assert torch.allclose(module(x), net(x), atol=1e-4), "onnxruntime and PyTorch disagree"
        providers = module.session().get_providers()
        dev = resolve_device("auto")
        net_dev, x_dev = net.to(dev), x.to(dev)

        def rate(fn: Any, arg: torch.Tensor) -> float:
            fn(arg)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn(arg)
            _sync(dev)
            return batch * repeats / (time.perf_counter() - t0)

        ort_rate, torch_rate = rate(module, x), rate(net_dev, x_dev)
    out = {
        "part": "onnx",
        "onnxruntime": onnxruntime.__version__,
        "available_providers": onnxruntime.get_available_providers(),
        "session_providers": providers,
        "onnx_rows_per_s": ort_rate,
        "torch_rows_per_s": torch_rate,
        "torch_device": describe_device(dev),
    }
    print(
        f"ONNX serving (MLP 20-128-128-5, batch {batch}): onnxruntime {onnxruntime.__version__} on "
        f"{providers[0]}: {ort_rate:,.0f} rows/s; the same network in PyTorch on {out['torch_device']}: "
        f"{torch_rate:,.0f} rows/s"
    )
    return out


# A job of seconds: a tiny mnist1d teacher, one seed of two attacks, no budget curve.
SERVE_JOB: dict[str, Any] = {
    "teacher": {
        "dataset": "mnist1d",
        "dataset_params": {"num_train": 1000, "num_test": 500},
        "arch": "cnn1d",
        "objective": "cmim",
        "epochs": 5,
    },
    "audit": {
        "students": ["mlp"],
        "attacks": ["kd", "fm"],
        "seeds": 1,
        "epochs": 5,
        "ls_eps": [0.0],
        "ls_mixup": False,
        "control": True,
        "query_budgets": [],
    },
}


def serve(timeout: float = 300) -> dict[str, Any]:
    """`cmim serve` on its embedded default (SQLite, local worker) runs SERVE_JOB; its epoch events name
    the device the worker trained on."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="cmim-gpu-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMIM_")} | {
        "CMIM_DATABASE_URL": f"sqlite:///{tmp / 'cmim.db'}",
        "CMIM_ARTIFACT_URL": f"file://{tmp / 'artifacts'}",
        "CMIM_WORK_DIR": str(tmp / "work"),
        "CMIM_CACHE_DIR": str(tmp / "cache"),
        "CMIM_POLL_SECONDS": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    log = (tmp / "serve.log").open("w+")
    cmd = [sys.executable, "-c", "from worker.cli import cli; cli()", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base, key, t0 = f"http://127.0.0.1:{port}", "", time.monotonic()
    try:
        while time.monotonic() - t0 < 120 and not key:
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            for line in (tmp / "serve.log").read_text().splitlines():
                if line.startswith("API key (shown once): "):
                    key = line.split(": ", 1)[1].strip()
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {key}"}
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        t_job = time.monotonic()
        job = httpx.post(f"{base}/api/v1/jobs", json=SERVE_JOB, headers=headers, timeout=30).json()
        events: list[dict[str, Any]] = []
        status = job["status"]
        while status not in {"succeeded", "failed", "cancelled"} and time.monotonic() - t_job < timeout:
            time.sleep(1)
            after = events[-1]["id"] if events else 0
            r = httpx.get(f"{base}/api/v1/jobs/{job['id']}/events", params={"after": after}, headers=headers)
            events += r.json()
            status = httpx.get(f"{base}/api/v1/jobs/{job['id']}", headers=headers).json()["status"]
        seconds = time.monotonic() - t_job
        devices = sorted({e["data"].get("device", "") for e in events if e["kind"] == "epoch"})
        out = {
            "part": "serve",
            "status": status,
            "job_seconds": seconds,
            "epoch_events": sum(e["kind"] == "epoch" for e in events),
            "devices": devices,
        }
        print(f"cmim serve (embedded): job {status} in {seconds:.1f} s; epochs trained on {devices}")
        if status != "succeeded":
            print((tmp / "serve.log").read_text()[-4000:])
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("part", choices=["trainer", "lockstep", "serve", "onnx"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a CPU check of the script itself")
    args = ap.parse_args()
    small = args.small
    if args.part == "serve":
        out = serve()
    elif args.part == "onnx":
        out = onnx_serving()
    elif args.part == "trainer":
        n, arch = (256, "resnet8") if small else (10_240, "resnet32x4")
        out = trainer(arch, n, 256 if small else 2_000, 3 if small else 4, 64, args.device)
    else:
        n, arch, t = (256, "resnet8", "resnet8") if small else (10_240, "resnet8x4", "resnet32x4")
        out = lockstep(arch, t, 2 if small else 8, n, 256 if small else 2_000, 1 if small else 3, args.device)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
