"""An owner's ONNX model as a black box: checked before use, run through onnxruntime, never executed as code.

An ONNX file is a protobuf graph of standard operators; parsing it runs nothing. We refuse what could
reach outside the graph (external-data files, custom-op domains, local functions of other domains)
and anything that is not one input -> one (batch, classes) output, then run it with onnxruntime on the
CPU (CUDA when the CUDA provider is there), wrapped so that it behaves like the zoo's nn.Modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ml.data import Dataset

# onnxruntime runs these domains' operators natively; anything else needs a custom-op library.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
MIN_OPSET, MAX_OPSET = 7, 23
Output = Literal["logits", "probabilities"]
ONNX_ARCH, ONNX_NAME = "onnx", "model.onnx"  # how a served ONNX model is named in its config and artifacts
INSTALL_HINT = "ONNX models need the onnx and onnxruntime packages: pip install onnx onnxruntime"


class OnnxValidationError(ValueError):
    """An ONNX file cmim refuses; the message names what is wrong, in one line."""


@dataclass(frozen=True)
class OnnxSummary:
    """What validation learned: the input shape of one example, the class count, the opset."""

    input_shape: tuple[int, ...]
    num_classes: int
    opset: int
    input_name: str
    output_name: str


def _import() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:  # pragma: no cover - both are dependencies; a trimmed install says what to add
        raise OnnxValidationError(INSTALL_HINT) from None
    return onnx, onnxruntime


def _dims(value_info: Any) -> list[int | None]:
    """Static dims of a graph input/output, None where symbolic or unknown."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _parse(data: bytes) -> Any:
    onnx, _ = _import()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning-like errors
        raise OnnxValidationError(f"not an ONNX model (the protobuf does not parse: {e})") from None
    if not model.graph.node:
        raise OnnxValidationError("not an ONNX model (its graph has no operators)")
    return model


def _check_external_data(model: Any) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    external = [t.name or "(unnamed)" for t in _get_all_tensors(model) if uses_external_data(t)]
    if external:
        raise OnnxValidationError(
            f"tensor(s) {', '.join(external[:5])} use external data files; export with all weights inside "
            "the .onnx (torch.onnx.export(..., external_data=False), or onnx.save without external data)"
        )


def _check_ops(model: Any) -> int:
    """Allowed opset domains and versions, no custom-op nodes; returns the default-domain opset."""
    opset = None
    for imp in model.opset_import:
        if imp.domain not in ALLOWED_DOMAINS:
            raise OnnxValidationError(
                f"custom operator domain {imp.domain!r} is not allowed; allowed: standard ONNX "
                f"(ai.onnx, ai.onnx.ml) operators only"
            )
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    if opset is None:
        raise OnnxValidationError("the model imports no standard ONNX opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxValidationError(
            f"opset {opset} is not supported; allowed opsets: {MIN_OPSET} to {MAX_OPSET}"
        )
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ALLOWED_DOMAINS})
    if custom:
        raise OnnxValidationError(
            f"custom operator(s) {', '.join(custom)} are not allowed; standard ONNX operators only"
        )
    return opset


def _inline_functions(model: Any) -> Any:
    """Local functions inlined (exporters emit them for submodules) so every node is checked as an op."""
    if not model.functions:
        return model
    from onnx import inliner

    return inliner.inline_local_functions(model)


def validate_onnx(data: bytes, input_shape: tuple[int, ...] | None = None) -> OnnxSummary:
    """Check an ONNX file's bytes without trusting them; raises OnnxValidationError naming the problem.

    `input_shape` (one example, no batch axis) fills dims the graph leaves symbolic and must agree with
    the ones it fixes. A test batch of zeros must come back as (batch, classes)."""
    onnx, _ = _import()
    model = _parse(data)
    _check_external_data(model)
    model = _inline_functions(model)
    opset = _check_ops(model)
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - onnx raises ValidationError and friends
        raise OnnxValidationError(f"the ONNX checker refuses the model: {str(e).splitlines()[0]}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise OnnxValidationError(f"the model must have exactly one input; it has {len(inputs)}")
    if len(model.graph.output) != 1:
        raise OnnxValidationError(
            f"the model must have exactly one output (batch, classes); it has {len(model.graph.output)}"
        )
    (inp,), (out,) = inputs, model.graph.output
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise OnnxValidationError("the model's input must be float32")
    if not _dims(inp) or _dims(inp)[0] is not None:
        raise OnnxValidationError(
            f"the model's input {_dims(inp)} has no dynamic batch axis; export it with one "
            "(torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes={'input': {0: 'batch'}})"
        )
    dims = _dims(inp)[1:]
    if input_shape is not None:
        if len(dims) != len(input_shape) or any(
            d not in (None, s) for d, s in zip(dims, input_shape, strict=True)
        ):
            shown = ["?" if d is None else d for d in dims]
            raise OnnxValidationError(
                f"the model's input is (batch, {', '.join(map(str, shown))}) but the data's examples are "
                f"{tuple(input_shape)}"
            )
        dims = list(input_shape)
    if not dims or any(d is None or d < 1 for d in dims):
        raise OnnxValidationError(
            f"the model's input shape {_dims(inp)} has unknown dims; declare input_shape (or a data set)"
        )
    out_dims = _dims(out)
    if len(out_dims) != 2:
        raise OnnxValidationError(f"the model's output must be (batch, classes); it has rank {len(out_dims)}")
    shape = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    if math.prod(shape) > 50_000_000:
        raise OnnxValidationError(f"input shape {shape} is too large")
    session = _session(model.SerializeToString())
    try:
        probe = session.run(None, {inp.name: np.zeros((2, *shape), dtype=np.float32)})
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
        raise OnnxValidationError(f"onnxruntime fails on a batch of 2: {str(e).splitlines()[0]}") from None
    if len(probe) != 1 or probe[0].ndim != 2 or probe[0].shape[0] != 2:
        got = [tuple(p.shape) for p in probe]
        raise OnnxValidationError(
            f"on a batch of 2 the model answered {got}; expected one (2, classes) output"
        )
    classes = int(probe[0].shape[1])
    if classes < 2:
        raise OnnxValidationError(f"the model's output has {classes} class; at least 2 are needed")
    return OnnxSummary(shape, classes, opset, inp.name, out.name)


def _session(data: bytes) -> Any:
    """An onnxruntime session: CUDA when its provider is available, else CPU; no custom-op libraries."""
    _, ort = _import()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Torch and onnxruntime share the cores: onnxruntime's threads must not spin-wait between calls,
    # or every torch op in between (the audit's students) runs on starved cores.
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = [
        p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
    ]
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise OnnxValidationError(f"onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None


class OnnxModule(nn.Module):
    """An ONNX model behind the nn.Module interface the server, the oracle and the audit call.

    forward(x) -> logits (B, classes) on x's device, as float32; a model exporting probabilities is
    answered with their log, so a softmax gives them back. It has no parameters: it is a black box.
    Pickles as its bytes (spawned audit workers rebuild the session)."""

    def __init__(self, data: bytes, output: Output = "logits") -> None:
        super().__init__()
        self.data, self.output = data, output
        # An empty parameter: code that asks a model for its device (next(model.parameters())) works.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self._session: Any = None
        self._input = ""

    def session(self) -> Any:
        if self._session is None:
            self._session = _session(self.data)
            self._input = self._session.get_inputs()[0].name
        return self._session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self.session()
        array = x.detach().float().cpu().numpy()
        (out,) = session.run(None, {self._input: np.ascontiguousarray(array)})
        y = torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
        return torch.log(y.clamp_min(1e-12)) if self.output == "probabilities" else y

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None
        return state


def load_onnx(
    data: bytes,
    output: Output = "logits",
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> tuple[OnnxModule, OnnxSummary]:
    """Validate ONNX bytes (against the data's input shape and class count when given) and wrap them."""
    summary = validate_onnx(data, input_shape)
    if num_classes is not None and summary.num_classes != num_classes:
        raise OnnxValidationError(
            f"the model answers {summary.num_classes} classes but the data set has {num_classes}"
        )
    return OnnxModule(data, output).eval(), summary


def load_onnx_teacher(path: str | Path, dataset: Dataset, output: Output = "logits") -> OnnxModule:
    """An .onnx file checked against the data set it answers for, ready to audit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    return load_onnx(path.read_bytes(), output, tuple(dataset.input_shape), dataset.num_classes)[0]
