"""CIFAR-10 and CIFAR-100 from the official python-version files in a local directory (never downloaded)."""

from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from ml.data.base import Splits, register_dataset

try:  # numpy >= 2 moved the internals to numpy._core
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

# Everything a pickled ndarray needs, and nothing else: the official archives are Python 2 pickles
# (numpy.core names), re-pickled ones use numpy._core, and protocol 5 pickles use _frombuffer.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}") from None


def safe_unpickle(data: bytes) -> Any:
    """Unpickle bytes that may only contain numpy arrays, numbers, strings, lists and dicts."""
    # encoding="bytes" keeps Python 2 str as bytes, which is what the official archives hold.
    return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()


@dataclass(frozen=True)
class CifarFiles:
    """Where one CIFAR variant's files live and which keys hold labels and class names."""

    title: str
    folder: str
    archive: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str  # the class names are under the same key, singular, + "_names"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)

    @property
    def names_key(self) -> str:
        """The meta file's key of the class names: label_names, fine_label_names."""
        return f"{self.label_key.removesuffix('s')}_names"


CIFAR10 = CifarFiles(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test="test_batch",
    meta="batches.meta",
    label_key="labels",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarFiles(
    title="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train=("train",),
    test="test",
    meta="meta",
    label_key="fine_labels",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def _read_files(data_dir: Path, spec: CifarFiles) -> dict[str, bytes]:
    """The raw bytes of every file spec needs, from the extracted folder or else from the .tar.gz."""
    folder = data_dir / spec.folder
    if all((folder / f).is_file() for f in spec.files):
        return {f: (folder / f).read_bytes() for f in spec.files}
    archive = data_dir / spec.archive
    if archive.is_file():
        wanted = {f"{spec.folder}/{f}": f for f in spec.files}
        found: dict[str, bytes] = {}
        # Read members in memory by exact name; nothing is extracted to disk.
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    found[wanted[member.name]] = tar.extractfile(member).read()
        missing = [f for f in spec.files if f not in found]
        if not missing:
            return found
        raise FileNotFoundError(f"{archive} lacks {', '.join(f'{spec.folder}/{f}' for f in missing)}")
    expected = ", ".join(f"{spec.folder}/{f}" for f in spec.files)
    raise FileNotFoundError(
        f"{spec.title} not found in {data_dir.resolve()}: expected the files {expected} "
        f"or the archive {spec.archive} (python version, https://www.cs.toronto.edu/~kriz/cifar.html). "
        f"Nothing is downloaded: put them there, set CMIM_DATA_DIR or pass data_dir."
    )


def _field(d: Any, key: str, file: str) -> Any:
    """d[key] for a bytes-keyed (official) or str-keyed (re-pickled) dict."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise ValueError(f"CIFAR file {file!r} has no {key!r} entry")


def _batch(raw: bytes, file: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, 3, 32, 32), y int64) from one pickled batch."""
    d = safe_unpickle(raw)
    data, labels = _field(d, "data", file), _field(d, label_key, file)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
        raise ValueError(f"CIFAR file {file!r}: 'data' is not an (N, 3072) uint8 array")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (len(data),):
        raise ValueError(f"CIFAR file {file!r}: {len(data)} images but {y.size} labels")
    # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    return data.reshape(-1, 3, 32, 32), y


def _load(spec: CifarFiles, data_dir: Path | None) -> Splits:
    """Read spec's files from data_dir (default $CMIM_DATA_DIR, else ./data) into raw [0, 1] images."""
    root = Path(data_dir or os.environ.get("CMIM_DATA_DIR") or "data")
    raw = _read_files(root, spec)
    meta = safe_unpickle(raw[spec.meta])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(meta, spec.names_key, spec.meta)]
    train = [_batch(raw[f], f, spec.label_key) for f in spec.train]
    x_test, y_test = _batch(raw[spec.test], spec.test, spec.label_key)
    x_train, y_train = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    for split, y in (("train", y_train), ("test", y_test)):
        if y.min() < 0 or y.max() >= len(names):
            raise ValueError(f"{spec.title} {split} labels fall outside 0..{len(names) - 1}")
    return Splits(
        x_train=x_train.astype(np.float32) / 255,
        y_train=y_train,
        x_test=x_test.astype(np.float32) / 255,
        y_test=y_test,
        class_names=names,
        augmentation="crop_flip",
        mean=list(spec.mean),
        std=list(spec.std),
    )


class CifarParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path | None = None  # None: $CMIM_DATA_DIR, else ./data


def load_cifar(spec: CifarFiles, p: CifarParams) -> Splits:
    """A CIFAR variant (CIFAR-100: its fine labels) from its extracted folder or its .tar.gz in the data
    directory."""
    return _load(spec, p.data_dir)


for _name, _spec, _classes, _labels in (
    ("cifar10", CIFAR10, 10, "10 classes"),
    ("cifar100", CIFAR100, 100, "100 fine classes"),
):
    register_dataset(
        _name,
        description=f"{_spec.title} (32x32 colour, {_labels}) from local files in data_dir; never downloaded",
        params=CifarParams,
        input_shape=(3, 32, 32),
        num_classes=_classes,
    )(functools.partial(load_cifar, _spec))
