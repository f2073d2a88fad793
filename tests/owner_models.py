"""Models and data an owner might upload, good and bad: models built with the onnx helpers (no exporter
needed), and a small tabular data set (`spiral`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_onnx(
    features: int = 20, classes: int = 5, outputs: int = 1, domain: str = "", batch: int | str = "batch"
) -> bytes:
    """x (batch, features) -> x @ W (batch, classes); `outputs` copies of it; `domain` for a custom op."""
    w = numpy_helper.from_array(np.ones((features, classes), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"])]
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        nodes.append(helper.make_node("Pwn", ["y0"], ["y1"], domain=domain))
        opsets.append(helper.make_opsetid(domain, 1))
    last = "y1" if domain else "y0"
    outs = [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["batch", classes])]
    for i in range(1, outputs):
        nodes.append(helper.make_node("Identity", [last], [f"copy{i}"]))
        outs.append(helper.make_tensor_value_info(f"copy{i}", TensorProto.FLOAT, ["batch", classes]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])], outs, [w]
    )
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def external_data_onnx(folder: Path) -> bytes:
    """A valid model whose weights live in a separate file (the .onnx only points at it)."""
    model = onnx.load_model_from_string(linear_onnx())
    path = folder / "external.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="external.data", size_threshold=0)
    return path.read_bytes()


def edited_checkpoint(
    folder: Path, out: Path, rename: dict[str, str] | None = None, **config: object
) -> Path:
    """A copy of the checkpoint in `folder` with keys renamed and config fields replaced."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors = {(rename or {}).get(k, k): v for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"))
    meta = json.loads((folder / "model.json").read_text()) | config
    (out / "model.json").write_text(json.dumps(meta))
    return out


def spiral(path: Path, n: int = 240, classes: int = 3, seed: int = 0) -> Path:
    """A small tabular data set as an npz upload: interleaved spiral arms in 2-D, with noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    t = rng.uniform(0.2, 1.0, n)
    angle = 2 * np.pi * (y / classes + 0.8 * t)
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], 1) + rng.normal(0, 0.03, (n, 2))
    cut = n * 2 // 3
    np.savez(path, x_train=x[:cut].astype(np.float32), y_train=y[:cut], x_test=x[cut:].astype(np.float32),
             y_test=y[cut:])  # fmt: skip
    return path
