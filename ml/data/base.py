"""The Dataset record, the dataset registry and the helpers every source shares."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ml.data.augment import augment_batch, check_augmentation
from ml.registry import Registry

# Where the data lives is not what it is: the same bytes at another path have the same fingerprint.
_LOCATION_PARAMS = frozenset({"path", "data_dir"})


def fingerprint_arrays(*arrays: np.ndarray | torch.Tensor, **meta: Any) -> str:
    """sha256 hex over each array's dtype, shape and bytes, then the JSON of meta (sorted keys)."""
    h = hashlib.sha256()
    for a in arrays:
        arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape};".encode())
        h.update(arr)
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def stratified_indices(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of round(fraction * n_c) (at least 1) random samples of every class c of y, shuffled."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picked.append(rng.permutation(idx)[: max(1, round(fraction * len(idx)))])
    # Shuffled, not sorted: sources stored by class (mnist5k) must not give class-ordered splits.
    return rng.permutation(np.concatenate(picked))


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test), test_fraction of every class in test; both splits shuffled."""
    test = stratified_indices(y, test_fraction, seed)
    train = np.random.default_rng([seed, 1]).permutation(np.setdiff1d(np.arange(len(y)), test))
    return x[train], y[train], x[test], y[test]


class SplitParams(BaseModel):
    """A bundled labelled array split by class: the test share and the split's seed."""

    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 0


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of an (N, C, ...) array; a constant channel gets std 1 (no division by 0)."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    std[std == 0] = 1.0
    return mean.tolist(), std.tolist()


@dataclass
class Splits:
    """What a source loader returns: raw arrays plus the facts only the source knows."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    augmentation: str
    mean: list[float] | None = None  # None: per-channel statistics of x_train
    std: list[float] | None = None


@dataclass
class Dataset:
    """A loaded dataset: raw float32 inputs, int64 labels, and how to normalise and augment them."""

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    augmentation: str
    fingerprint: str
    params: dict[str, Any]

    def augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """This dataset's training augmentation applied to batch x."""
        return augment_batch(self.augmentation, x, generator, std=torch.tensor(self.std))

    def with_augmentation(self, kind: str | None) -> Dataset:
        """The same data with another training augmentation (None: unchanged); ValueError if unfit."""
        if kind is None or kind == self.augmentation:
            return self
        check_augmentation(kind, self.input_shape)
        return replace(self, augmentation=kind)

    def subset_train(self, fraction: float, seed: int) -> Dataset:
        """A stratified `fraction` of the train split (same test split, same normalisation)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        idx = torch.from_numpy(stratified_indices(self.y_train.cpu().numpy(), fraction, seed))
        idx = idx.to(self.x_train.device)
        x, y = self.x_train[idx], self.y_train[idx]
        fp = fingerprint_arrays(
            x,
            y,
            self.x_test,
            self.y_test,
            name=self.name,
            parent=self.fingerprint,
            subset={"fraction": fraction, "seed": seed},
        )
        return replace(self, x_train=x, y_train=y, fingerprint=fp)

    def to_bytes(self) -> bytes:
        """The whole record (tensors and metadata) as bytes that `from_bytes` reads back exactly."""
        buf = io.BytesIO()
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Dataset:
        """A record written by `to_bytes` (tensors and plain values only: nothing else is unpickled)."""
        return cls(**torch.load(io.BytesIO(data), weights_only=True))

    @property
    def nbytes(self) -> int:
        """The bytes its four tensors hold."""
        return sum(t.nbytes for t in (self.x_train, self.y_train, self.x_test, self.y_test))


class DatasetInfo(BaseModel):
    """Static description of a registered dataset (no data is loaded)."""

    name: str
    description: str
    input_shape: tuple[int, ...] | None  # None: depends on the data (e.g. a user's npz)
    num_classes: int | None
    params: dict[str, Any]  # parameter name -> default (None for a required parameter)


@dataclass(frozen=True)
class DatasetLoader:
    """A registry entry: validates parameters, calls the source and assembles the Dataset."""

    info: DatasetInfo
    params_model: type[BaseModel]
    load: Callable[[Any], Splits]

    def __call__(self, **params: Any) -> Dataset:
        """Load the dataset with validated params."""
        name, valid = self.info.name, list(self.params_model.model_fields)
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for dataset {name!r}; "
                f"valid parameters: {', '.join(valid) or '(none)'}"
            )
        try:
            p = self.params_model.model_validate(params)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"invalid parameters for dataset {name!r}: {problems}") from None
        return _assemble(name, p.model_dump(mode="json"), self.load(p))


def _assemble(name: str, params: dict[str, Any], s: Splits) -> Dataset:
    """Turn a source's arrays into the Dataset record (tensors, shapes, statistics, fingerprint)."""
    x_train = torch.from_numpy(np.ascontiguousarray(s.x_train, dtype=np.float32))
    x_test = torch.from_numpy(np.ascontiguousarray(s.x_test, dtype=np.float32))
    y_train = torch.from_numpy(np.ascontiguousarray(s.y_train, dtype=np.int64))
    y_test = torch.from_numpy(np.ascontiguousarray(s.y_test, dtype=np.int64))
    if s.mean is None or s.std is None:
        mean, std = channel_stats(x_train.numpy())
    else:
        mean, std = s.mean, s.std
    meta = {k: v for k, v in params.items() if k not in _LOCATION_PARAMS}
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        input_shape=tuple(x_train.shape[1:]),
        num_classes=len(s.class_names),
        class_names=list(s.class_names),
        mean=list(mean),
        std=list(std),
        augmentation=s.augmentation,
        fingerprint=fingerprint_arrays(x_train, y_train, x_test, y_test, name=name, params=meta),
        params=params,
    )


DATASETS: Registry[DatasetLoader] = Registry("dataset")


def register_dataset(
    name: str,
    *,
    description: str,
    params: type[BaseModel],
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> Callable[[Callable[[Any], Splits]], Callable[[Any], Splits]]:
    """Decorator registering a source function `(validated params) -> Splits` under `name`."""

    def deco(fn: Callable[[Any], Splits]) -> Callable[[Any], Splits]:
        defaults = {k: (None if f.is_required() else f.default) for k, f in params.model_fields.items()}
        info = DatasetInfo(
            name=name,
            description=description,
            input_shape=input_shape,
            num_classes=num_classes,
            params=defaults,
        )
        DATASETS.register(name)(DatasetLoader(info=info, params_model=params, load=fn))
        return fn

    return deco


DigitSource = Callable[[Any], tuple[np.ndarray, np.ndarray]]


def register_digits(
    name: str, *, description: str, input_shape: tuple[int, ...], params: type[SplitParams] = SplitParams
) -> Callable[[DigitSource], DigitSource]:
    """Decorator registering a bundled digit set: its source `(validated params) -> (x, y)` gives images
    and labels 0..9, which are split by class (`stratified_split`) and get no augmentation."""

    def deco(fn: DigitSource) -> DigitSource:
        def load(p: SplitParams) -> Splits:
            x_train, y_train, x_test, y_test = stratified_split(*fn(p), p.test_fraction, p.seed)
            names = [str(i) for i in range(10)]
            return Splits(x_train, y_train, x_test, y_test, class_names=names, augmentation="none")

        register_dataset(
            name, description=description, params=params, input_shape=input_shape, num_classes=10
        )(load)
        return fn

    return deco


def load_dataset(name: str, **params: Any) -> Dataset:
    """Load a registered dataset; unknown name -> UnknownNameError, bad params -> ValueError."""
    return DATASETS.get(name)(**params)


def dataset_infos() -> list[DatasetInfo]:
    """Static descriptions of every registered dataset."""
    return [loader.info for _, loader in DATASETS.items()]
