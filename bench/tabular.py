"""Tabular accuracy: `cmim train --arch mlp --objective ce` against a plain PyTorch MLP, in one run.

The data: scikit-learn `make_classification`, 20 features, 5 classes, 4,000 train / 4,000 test, saved as
an npz with labels 1..5 (cmim maps them to 5 classes). The plain MLP has cmim's `mlp` width (20-128-128-5),
the same schedule (AdamW lr 1e-2, weight decay 1e-2, per-step cosine, batch 128, the same epochs) and
per-feature standardisation fitted on the train split, as a newcomer would write it. Prints both test
accuracies (last epoch) and their difference, then one JSON line.

    python bench/tabular.py --epochs 60 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import make_classification
from torch import nn


def make_npz(path: Path, seed: int) -> None:
    x, y = make_classification(
        n_samples=8000, n_features=20, n_informative=10, n_classes=5, random_state=seed
    )
    x = x.astype(np.float32)
    np.savez(path, x_train=x[:4000], y_train=y[:4000] + 1, x_test=x[4000:], y_test=y[4000:] + 1)


def plain_mlp(path: Path, epochs: int, seed: int) -> float:
    """Test accuracy (%) of a plain PyTorch MLP trained the way cmim's defaults train one."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d = np.load(path)
    x_train, x_test = torch.from_numpy(d["x_train"]), torch.from_numpy(d["x_test"])
    y_train, y_test = torch.from_numpy(d["y_train"] - 1), torch.from_numpy(d["y_test"] - 1)
    mean, std = x_train.mean(0), x_train.std(0)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    net = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 5))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    steps = math.ceil(len(x_train) / 128)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(128):
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        return 100.0 * (net(x_test).argmax(-1) == y_test).float().mean().item()


def cmim_train(path: Path, out: Path, epochs: int, seed: int) -> float:
    """Test accuracy (%) of `cmim train --arch mlp --objective ce` on the same npz (its last epoch)."""
    cmd = [
        sys.executable, "-m", "worker.cli", "train", "--dataset", "npz", "--dataset-param", f"path={path}",
        "--arch", "mlp", "--objective", "ce", "--epochs", str(epochs), "--seed", str(seed),
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(json.loads((out / "model.json").read_text())["metrics"]["last_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tabular.npz"
        make_npz(path, args.seed)
        t0 = time.perf_counter()
        plain = plain_mlp(path, args.epochs, args.seed)
        t1 = time.perf_counter()
        cmim = cmim_train(path, Path(tmp) / "run", args.epochs, args.seed)
        t2 = time.perf_counter()
    print(f"plain PyTorch MLP: {plain:.2f}% test accuracy ({t1 - t0:.0f} s)")
    print(f"cmim train --arch mlp --objective ce: {cmim:.2f}% ({t2 - t1:.0f} s)")
    print(f"difference (cmim - plain): {cmim - plain:+.2f} points")
    result = {
        "epochs": args.epochs,
        "seed": args.seed,
        "plain_acc": plain,
        "cmim_acc": cmim,
        "diff": cmim - plain,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
