"""A predict request's inputs: v2 datatypes, and nested or binary tensors decoded into a checked batch."""

from __future__ import annotations

import math

import numpy as np
import torch

from app.problems import Problem, validation_problem
from ml.loading import ModelMeta

# v2 datatypes a model takes: float tensors, cast to the model's FP32. Integers and booleans are refused
# rather than silently reinterpreted (an INT8 tensor carrying 1000.5 is not an INT8 tensor).
ACCEPTED_DATATYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


def _bad(loc: list, msg: str) -> Problem:
    return validation_problem([{"loc": loc, "msg": msg, "type": "value_error"}])


def check_datatype(datatype: str, loc: list) -> np.dtype:
    """The numpy dtype of an accepted v2 datatype; 422 naming the accepted ones otherwise."""
    if datatype not in ACCEPTED_DATATYPES:
        raise _bad(
            loc,
            f"datatype {datatype!r} is not accepted: send {' or '.join(ACCEPTED_DATATYPES)} "
            "(FP64 is cast to the model's FP32)",
        )
    return ACCEPTED_DATATYPES[datatype]


def as_batch(
    values: object,
    shape: list[int] | None,
    meta: ModelMeta,
    max_batch: int,
    loc: list,
    dtype: np.dtype = ACCEPTED_DATATYPES["FP32"],
) -> torch.Tensor:
    """A (B, *input_shape) float32 batch from nested or flat numbers (or raw bytes); 422 on any mismatch."""
    if math.prod(shape or [0]) > max_batch * math.prod(meta.input_shape):
        raise _bad(loc, f"shape {shape} holds more than {max_batch} inputs")
    if isinstance(values, bytes):
        if shape is None or len(values) != math.prod(shape) * dtype.itemsize:
            raise _bad(loc, f"binary data of {len(values)} bytes does not hold shape {shape} of {dtype.name}")
        arr = np.frombuffer(values, dtype=dtype)
    else:
        try:
            arr = np.asarray(values, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise _bad(loc, f"inputs must be a rectangular array of numbers: {e}") from None
    if shape is not None:
        if math.prod(shape) != arr.size:
            raise _bad(loc, f"shape {shape} holds {math.prod(shape)} values but data has {arr.size}")
        arr = arr.reshape(shape)
    expected = tuple(meta.input_shape)
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
        raise _bad(loc, f"expected shape (batch, {', '.join(map(str, expected))}), got {tuple(arr.shape)}")
    if not 1 <= arr.shape[0] <= max_batch:
        raise _bad(loc, f"batch size must be between 1 and {max_batch}, got {arr.shape[0]}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise _bad(loc, "inputs contain NaN or infinite values (or FP64 values beyond FP32)")
    return torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)
