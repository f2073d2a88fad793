"""A user's own data as an .npz with x_train, y_train, x_test, y_test (and optional class_names), validated
before use. x of shape (N, F) is tabular: one example is (F,) features."""

from __future__ import annotations

import hashlib
import math
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from pydantic import BaseModel, ConfigDict

from ml.data.base import Splits, register_dataset

KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("class_names",)
MAX_CLASS_NAME = 200
MAX_TOTAL_BYTES = 2 * 1024**3
MAX_RATIO = 200
# Below this size a member cannot be a bomb, and tiny constant arrays legitimately compress >200:1.
_RATIO_FLOOR = 1024**2

Source = str | Path | IO[bytes]
# numpy writes 3.0 only for non-latin-1 field names, i.e. structured dtypes we refuse anyway.
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class DataValidationError(ValueError):
    """A user's data file is unusable; the message says exactly why, in one line."""


class NpzSummary(BaseModel):
    """What validation learned about a valid npz file."""

    input_shape: tuple[int, ...]
    num_classes: int
    n_train: int
    n_test: int
    class_names: list[str]
    labels: list[int]  # the label value of each class 0..C-1 (the identity when labels are 0..C-1)
    sha256: str | None = None


def _sha256(source: Source) -> str:
    """sha256 hex of the file's bytes (a file object is rewound to where it was)."""
    h = hashlib.sha256()
    if isinstance(source, str | Path):
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    start = source.tell()
    for chunk in iter(lambda: source.read(1 << 20), b""):
        h.update(chunk)
    source.seek(start)
    return h.hexdigest()


def _is_unsafe(name: str) -> bool:
    """True for an absolute member path, a drive letter or any '..' component."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in PurePosixPath(posix).parts


def _check_members(infos: list[zipfile.ZipInfo], max_total_bytes: int, max_ratio: float) -> None:
    """Refuse path traversal and decompression bombs from the zip directory alone, before reading data."""
    for info in infos:
        if _is_unsafe(info.filename):
            raise DataValidationError(f"zip member {info.filename!r} has an unsafe path (absolute or '..')")
    total = sum(info.file_size for info in infos)
    if total > max_total_bytes:
        raise DataValidationError(
            f"archive expands to {total:,} bytes, over the {max_total_bytes:,}-byte limit (possible zip bomb)"
        )
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_FLOOR and ratio > max_ratio:
            raise DataValidationError(
                f"zip member {info.filename!r} has compression ratio {ratio:.0f}:1, "
                f"over {max_ratio:.0f}:1 (possible zip bomb)"
            )


def _check_keys(infos: list[zipfile.ZipInfo]) -> None:
    """Require the four keys (class_names optional), each stored once."""
    names = [info.filename.removesuffix(".npy") for info in infos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataValidationError(f"duplicate key(s): {', '.join(duplicates)}")
    missing = [k for k in KEYS if k not in names]
    if missing:
        raise DataValidationError(f"missing key(s): {', '.join(missing)}; expected exactly {', '.join(KEYS)}")
    unexpected = sorted(set(names) - set(KEYS) - set(OPTIONAL_KEYS))
    if unexpected:
        raise DataValidationError(
            f"unexpected key(s): {', '.join(unexpected)}; expected exactly {', '.join(KEYS)} "
            f"(and optionally {', '.join(OPTIONAL_KEYS)})"
        )


def _check_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse pickled arrays and headers declaring more data than stored (numpy allocates it up front)."""
    key = info.filename.removesuffix(".npy")
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in _HEADER_READERS:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = _HEADER_READERS[version](f)
        except ValueError as e:
            raise DataValidationError(f"array {key!r} is not a valid .npy array: {e}") from None
    if key in OPTIONAL_KEYS:
        if dtype.kind != "U" or len(shape) != 1:
            raise DataValidationError(f"{key} must be a 1-D array of strings (numpy dtype 'U'); got {dtype}")
    if dtype.hasobject:
        raise DataValidationError(
            f"array {key!r} holds Python objects (pickled); only numeric arrays are accepted"
        )
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise DataValidationError(
            f"array {key!r} declares shape {shape} ({declared:,} bytes) "
            f"but stores only {info.file_size:,} bytes"
        )


def _load_arrays(source: Source) -> dict[str, np.ndarray]:
    """The arrays, read with allow_pickle=False."""
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {k: npz[k] for k in (*KEYS, *OPTIONAL_KEYS) if k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataValidationError(f"npz file could not be read: {e}") from None


def _is_numeric(dtype: np.dtype) -> bool:
    """Real integers or floats (not bool, complex, strings or structured)."""
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def _check_arrays(a: dict[str, np.ndarray], max_classes: int) -> NpzSummary:
    """Dtypes, ranks, shapes, lengths, finiteness and labels; returns the summary."""
    for k in ("x_train", "x_test"):
        if not _is_numeric(a[k].dtype):
            raise DataValidationError(f"{k} has dtype {a[k].dtype}; expected a float or integer dtype")
    for k in ("y_train", "y_test"):
        if not np.issubdtype(a[k].dtype, np.integer):
            raise DataValidationError(f"{k} has dtype {a[k].dtype}; labels must be integers")
    for k in ("x_train", "x_test"):
        if not 2 <= a[k].ndim <= 4:
            raise DataValidationError(
                f"{k} has shape {a[k].shape}; expected (N, L), (N, C, L) or (N, C, H, W)"
            )
    for k in ("y_train", "y_test"):
        if a[k].ndim != 1:
            raise DataValidationError(f"{k} has shape {a[k].shape}; expected (N,)")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataValidationError(
            f"x_train samples have shape {a['x_train'].shape[1:]} but x_test samples {a['x_test'].shape[1:]}"
        )
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if len(x) != len(y):
            raise DataValidationError(f"x_{split} has {len(x)} samples but y_{split} has {len(y)} labels")
        if len(x) == 0:
            raise DataValidationError(f"the {split} split is empty")
    for k in ("x_train", "x_test"):
        bad = int(np.count_nonzero(~np.isfinite(a[k]))) if np.issubdtype(a[k].dtype, np.floating) else 0
        if bad:
            raise DataValidationError(f"{k} has {bad} non-finite value(s) (NaN or inf)")
    # Labels that are not 0..C-1 (say 1..5) are mapped to 0..C-1 in sorted order, never padded with
    # classes no example has; each class keeps its original label as its name.
    labels = np.union1d(np.unique(a["y_train"]), np.unique(a["y_test"]))
    num_classes = len(labels)
    if num_classes < 2:
        raise DataValidationError("labels span only 1 class; at least 2 are needed")
    if num_classes > max_classes:
        raise DataValidationError(f"labels name {num_classes} classes, over the limit of {max_classes}")
    missing = np.setdiff1d(labels, np.unique(a["y_train"]))
    if len(missing):
        raise DataValidationError(
            f"label(s) {', '.join(map(str, missing[:5]))} occur in y_test but not in y_train"
        )
    names = [str(v) for v in labels]
    if "class_names" in a:
        names = [str(n) for n in a["class_names"]]
        if len(names) != num_classes:
            raise DataValidationError(
                f"class_names has {len(names)} names but the labels name {num_classes} classes"
            )
        for i, n in enumerate(names):  # names are stored and served back: text any JSON and database takes
            if not n.isprintable() or not 0 < len(n) <= MAX_CLASS_NAME:
                raise DataValidationError(
                    f"class_names[{i}] {n[:40]!r} is not a name: 1 to {MAX_CLASS_NAME} printable characters"
                )
    return NpzSummary(
        input_shape=a["x_train"].shape[1:],
        num_classes=num_classes,
        n_train=len(a["y_train"]),
        n_test=len(a["y_test"]),
        class_names=names,
        labels=[int(v) for v in labels],
    )


def _read_npz(
    source: Source, max_classes: int, max_total_bytes: int, max_ratio: float
) -> tuple[dict[str, np.ndarray], NpzSummary]:
    """Validate and read a user's npz: the four arrays and their summary."""
    start = None if isinstance(source, str | Path) else source.tell()

    def rewind() -> None:
        if start is not None:
            source.seek(start)

    sha256 = _sha256(source)
    if not zipfile.is_zipfile(source):
        raise DataValidationError("not an .npz file (not a zip archive); save it with numpy.savez")
    rewind()
    try:
        with zipfile.ZipFile(source) as zf:
            infos = zf.infolist()
            _check_members(infos, max_total_bytes, max_ratio)
            _check_keys(infos)
            for info in infos:
                _check_header(zf, info)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError) as e:
        # Corrupt directory, encrypted member or unsupported compression method.
        raise DataValidationError(f"unreadable zip archive: {e}") from None
    rewind()
    arrays = _load_arrays(source)
    summary = _check_arrays(arrays, max_classes)
    return arrays, summary.model_copy(update={"sha256": sha256})


def validate_npz(
    source: Source,
    max_classes: int = 1000,
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
) -> NpzSummary:
    """Check a user's npz (path or binary file object) without trusting it; raises DataValidationError."""
    return _read_npz(source, max_classes, max_total_bytes, max_ratio)[1]


class NpzParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path


def default_augmentation(input_shape: tuple[int, ...]) -> str:
    """Per modality: none for tabular (N, F) features, shifts for signals (C, L), crops for 32x32 images."""
    if len(input_shape) == 2 and input_shape[1] >= 8:
        return "shift_noise"
    if input_shape == (3, 32, 32):
        return "crop_flip"
    return "none"


@register_dataset(
    "npz",
    description="your own .npz: x_train, y_train, x_test, y_test (optional class_names); "
    "x is (N,F) tabular, (N,C,L) or (N,C,H,W)",
    params=NpzParams,
)
def load_npz(p: NpzParams) -> Splits:
    """Validated user arrays as raw float32 (standardised per feature or channel inside the model); labels
    mapped to 0..C-1; augmentation chosen from the input shape."""
    a, summary = _read_npz(p.path, 1000, MAX_TOTAL_BYTES, MAX_RATIO)
    labels = np.asarray(summary.labels)
    return Splits(
        a["x_train"],
        np.searchsorted(labels, a["y_train"]),
        a["x_test"],
        np.searchsorted(labels, a["y_test"]),
        class_names=summary.class_names,
        augmentation=default_augmentation(summary.input_shape),
    )
