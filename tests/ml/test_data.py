"""Tests for the dataset registry, the offline sources, augmentations and npz validation."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.data import (
    DATASETS,
    DataValidationError,
    augment_batch,
    dataset_infos,
    fingerprint_arrays,
    load_dataset,
    validate_npz,
)
from ml.data import mnist1d as mnist1d_source
from ml.data.cifar import safe_unpickle
from ml.registry import UnknownNameError

SMALL_MNIST1D = {"num_train": 400, "num_test": 100}


# --- registry ------------------------------------------------------------------------------------


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(UnknownNameError) as e:
        load_dataset("imagenet")
    for name in ("mnist1d", "digits", "mnist5k", "npz", "cifar10", "cifar100"):
        assert name in str(e.value)


def test_unknown_param_names_valid_params() -> None:
    match = r"unknown parameter\(s\) n_train .*valid parameters: num_train, num_test, seed"
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist1d", n_train=10)


def test_invalid_param_value_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="num_train"):
        load_dataset("mnist1d", num_train=-10, num_test=100)
    with pytest.raises(ValueError, match="multiple of 10"):
        load_dataset("mnist1d", num_train=401, num_test=100)


def test_dataset_infos_are_static() -> None:
    infos = {i.name: i for i in dataset_infos()}
    assert set(infos) == set(DATASETS.names())
    assert infos["mnist1d"].input_shape == (1, 40)
    assert infos["mnist1d"].params == {"num_train": 4000, "num_test": 1000, "seed": 42}
    assert infos["npz"].params == {"path": None}
    assert infos["cifar100"].num_classes == 100


def test_fingerprint_arrays_is_stable_and_sensitive() -> None:
    a, b = np.arange(6, dtype=np.float32), np.arange(3)
    fp = fingerprint_arrays(a, b, name="x", params={"seed": 1})
    assert fp == fingerprint_arrays(torch.from_numpy(a), b, params={"seed": 1}, name="x")
    assert fp != fingerprint_arrays(a, b, name="x", params={"seed": 2})
    assert fp != fingerprint_arrays(a.astype(np.float64), b, name="x", params={"seed": 1})
    assert fp != fingerprint_arrays(a.reshape(2, 3), b, name="x", params={"seed": 1})


# --- mnist1d, digits, mnist5k --------------------------------------------------------------------


def test_mnist1d_deterministic_shapes_and_labels() -> None:
    mnist1d_source._generate.cache_clear()  # regenerate, so determinism is the generator's, not the cache's
    d1 = load_dataset("mnist1d", **SMALL_MNIST1D)
    mnist1d_source._generate.cache_clear()
    d2 = load_dataset("mnist1d", **SMALL_MNIST1D)
    assert torch.equal(d1.x_train, d2.x_train) and torch.equal(d1.y_test, d2.y_test)
    assert d1.fingerprint == d2.fingerprint
    assert d1.x_train.shape == (400, 1, 40) and d1.x_test.shape == (100, 1, 40)
    assert d1.x_train.dtype == torch.float32 and d1.y_train.dtype == torch.int64
    assert d1.y_train.min() >= 0 and d1.y_train.max() < 10
    assert (d1.input_shape, d1.num_classes, d1.mean, d1.std) == ((1, 40), 10, [0.0], [1.0])
    assert d1.augmentation == "shift_noise" and d1.class_names == [str(i) for i in range(10)]
    other = load_dataset("mnist1d", **SMALL_MNIST1D, seed=7)
    assert not torch.equal(d1.x_train, other.x_train) and d1.fingerprint != other.fingerprint


def test_mnist1d_keeps_global_rngs_and_cache_is_not_shared_mutably() -> None:
    mnist1d_source._generate.cache_clear()
    np.random.seed(123)
    random.seed(123)
    d = load_dataset("mnist1d", **SMALL_MNIST1D)
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert random.random() == random.Random(123).random()
    d.x_train.zero_()  # a caller scribbling on its tensors must not reach the cache
    assert load_dataset("mnist1d", **SMALL_MNIST1D).x_train.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "shape", "n", "test_fraction"),
    [("digits", (1, 8, 8), 1797, 0.25), ("mnist5k", (1, 28, 28), 5000, 0.2)],
)
def test_bundled_image_sets_are_stratified(name: str, shape: tuple, n: int, test_fraction: float) -> None:
    d = load_dataset(name)
    assert d.x_train.shape[1:] == shape and len(d.x_train) + len(d.x_test) == n
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1
    train_counts = torch.bincount(d.y_train, minlength=10)
    test_counts = torch.bincount(d.y_test, minlength=10)
    expected = (train_counts + test_counts) * test_fraction
    assert torch.all((test_counts - expected).abs() <= 1)
    assert len(torch.unique(d.y_test[:50])) > 5  # shuffled, not in the source's class order
    assert d.augmentation == "none" and len(d.mean) == 1 and len(d.std) == 1
    assert d.mean[0] == pytest.approx(d.x_train.mean().item(), abs=1e-5)
    other = load_dataset(name, seed=1)
    assert not torch.equal(d.y_test, other.y_test)


def test_subset_train_is_stratified_and_keeps_test() -> None:
    d = load_dataset("digits")
    s = d.subset_train(0.1, seed=0)
    counts, full = torch.bincount(s.y_train, minlength=10), torch.bincount(d.y_train, minlength=10)
    assert torch.all((counts - full * 0.1).abs() <= 1)
    assert torch.equal(s.x_test, d.x_test) and s.mean == d.mean and s.params == d.params
    assert s.fingerprint != d.fingerprint
    assert torch.equal(d.subset_train(0.1, seed=0).x_train, s.x_train)
    assert not torch.equal(d.subset_train(0.1, seed=1).y_train, s.y_train)
    with pytest.raises(ValueError, match="fraction"):
        d.subset_train(0.0, seed=0)


def test_a_dataset_travels_as_bytes_exactly_and_unpickles_nothing_else() -> None:
    d = load_dataset("mnist1d", num_train=300, num_test=100).with_augmentation("feature_noise")
    back = type(d).from_bytes(d.to_bytes())
    tensors = ("x_train", "y_train", "x_test", "y_test")
    assert all(torch.equal(getattr(back, f), getattr(d, f)) for f in tensors)
    meta = lambda ds: {k: v for k, v in vars(ds).items() if k not in tensors}  # noqa: E731
    assert meta(back) == meta(d)
    assert d.nbytes == 300 * 40 * 4 + 300 * 8 + 100 * 40 * 4 + 100 * 8
    buf = io.BytesIO()
    torch.save({"name": Path("x")}, buf)  # any other class is refused by the weights-only reader
    with pytest.raises(pickle.UnpicklingError):
        type(d).from_bytes(buf.getvalue())


# --- augmentations -------------------------------------------------------------------------------


def test_shift_is_circular_and_bounded() -> None:
    x = torch.randn(64, 2, 40)
    out = augment_batch("shift_noise", x, torch.Generator().manual_seed(0), noise_std=0.0)
    assert torch.equal(out.sort(-1).values, x.sort(-1).values)  # values permuted, none lost
    shifts = set()
    for xi, oi in zip(x, out, strict=True):
        matches = [s for s in range(-3, 4) if torch.equal(torch.roll(xi, s, -1), oi)]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) == 7


def test_shift_noise_is_deterministic_given_generator() -> None:
    x = torch.randn(32, 1, 40)
    a = augment_batch("shift_noise", x, torch.Generator().manual_seed(5))
    b = augment_batch("shift_noise", x, torch.Generator().manual_seed(5))
    c = augment_batch("shift_noise", x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = a - augment_batch("shift_noise", x, torch.Generator().manual_seed(5), noise_std=0.0)
    assert 0.015 < noise.std().item() < 0.025


def test_crop_flip_shape_determinism_and_flips() -> None:
    # Every row is the ramp 1..32, so a flipped sample reads right to left.
    x = torch.arange(1, 33, dtype=torch.float32).expand(64, 3, 32, 32).clone()
    a = augment_batch("crop_flip", x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape
    assert torch.equal(a, augment_batch("crop_flip", x, torch.Generator().manual_seed(0)))
    directions = set()
    for img in a:
        row = img[0, 16]
        vals = row[row > 0]
        assert torch.all(vals.diff().abs() == 1)  # a contiguous window of the ramp, maybe reversed
        directions.add(bool(vals.diff()[0] > 0))
    assert directions == {True, False}
    assert (a == 0).any()  # some crops reach into the zero padding


def test_none_and_unknown_augmentation() -> None:
    x = torch.randn(4, 1, 8)
    assert augment_batch("none", x) is x
    with pytest.raises(ValueError, match="shift_noise, crop_flip, feature_noise, none"):
        augment_batch("cutout", x)
    d = load_dataset("mnist1d", **SMALL_MNIST1D)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(d.augment(d.x_train[:8], g1), augment_batch("shift_noise", d.x_train[:8], g2))


# --- npz -----------------------------------------------------------------------------------------


def _arrays(n_train: int = 30, n_test: int = 10, shape: tuple = (40,)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(n_train, *shape)).astype(np.float32),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.normal(size=(n_test, *shape)).astype(np.float32),
        "y_test": np.arange(n_test) % 3,
    }


def _npz(tmp_path: Path, compressed: bool = False, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _invalid(tmp_path: Path, match: str, **changes: np.ndarray | None) -> None:
    arrays = {k: v for k, v in {**_arrays(), **changes}.items() if v is not None}
    with pytest.raises(DataValidationError, match=match):
        validate_npz(_npz(tmp_path, **arrays))


def test_npz_valid_round_trip(tmp_path: Path) -> None:
    arrays = _arrays()
    path = _npz(tmp_path, **arrays)
    summary = validate_npz(path)
    assert (summary.input_shape, summary.num_classes, summary.n_train, summary.n_test) == ((40,), 3, 30, 10)
    assert summary.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert validate_npz(io.BytesIO(path.read_bytes())) == summary
    d = load_dataset("npz", path=str(path))
    assert torch.equal(d.x_train, torch.from_numpy(arrays["x_train"]))
    assert torch.equal(d.y_test, torch.from_numpy(arrays["y_test"]))
    # (N, F) is tabular: one example is F features, no augmentation, statistics per feature
    assert (d.input_shape, d.num_classes, d.augmentation) == ((40,), 3, "none")
    assert d.class_names == ["0", "1", "2"]
    np.testing.assert_allclose(d.mean, arrays["x_train"].mean(0), atol=1e-5)
    np.testing.assert_allclose(d.std, arrays["x_train"].std(0), atol=1e-5)
    moved = tmp_path / "elsewhere.npz"
    moved.write_bytes(path.read_bytes())
    assert load_dataset("npz", path=moved).fingerprint == d.fingerprint  # content, not location


def test_npz_images_get_crop_flip(tmp_path: Path) -> None:
    d = load_dataset("npz", path=_npz(tmp_path, **_arrays(shape=(3, 32, 32))))
    assert d.input_shape == (3, 32, 32) and d.augmentation == "crop_flip"
    assert len(d.mean) == 3


def test_npz_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))  # a plain .npy is not an npz
    with pytest.raises(DataValidationError, match=r"not an \.npz file"):
        validate_npz(path)


def test_npz_missing_keys(tmp_path: Path) -> None:
    _invalid(tmp_path, r"missing key\(s\): x_test, y_test", x_test=None, y_test=None)


def test_npz_unexpected_keys(tmp_path: Path) -> None:
    _invalid(tmp_path, r"unexpected key\(s\): extra", extra=np.zeros(2))


def test_npz_duplicate_keys(tmp_path: Path) -> None:
    path = _npz(tmp_path, **_arrays())
    with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("y_test.npy", b"")
    with pytest.raises(DataValidationError, match=r"duplicate key\(s\): y_test"):
        validate_npz(path)


def test_npz_pickled_object_array(tmp_path: Path) -> None:
    objects = np.array([{"a": 1}] * 30, dtype=object)
    _invalid(tmp_path, r"array 'x_train' holds Python objects \(pickled\); only numeric", x_train=objects)


def test_npz_x_dtype_not_numeric(tmp_path: Path) -> None:
    _invalid(tmp_path, "x_test has dtype bool; expected a float or integer", x_test=np.zeros((10, 40), bool))


def test_npz_y_dtype_not_integer(tmp_path: Path) -> None:
    _invalid(tmp_path, "y_train has dtype float64; labels must be integers", y_train=np.zeros(30))


@pytest.mark.parametrize("shape", [(30,), (30, 1, 2, 2, 2)])
def test_npz_x_rank(tmp_path: Path, shape: tuple) -> None:
    match = r"x_train has shape .*; expected \(N, L\), \(N, C, L\) or \(N, C, H, W\)"
    _invalid(tmp_path, match, x_train=np.zeros(shape))


def test_npz_y_rank(tmp_path: Path) -> None:
    _invalid(tmp_path, r"y_test has shape \(10, 1\); expected \(N,\)", y_test=np.zeros((10, 1), int))


def test_npz_sample_shapes_differ(tmp_path: Path) -> None:
    match = r"x_train samples have shape \(40,\) but x_test samples \(39,\)"
    _invalid(tmp_path, match, x_test=np.zeros((10, 39)))


def test_npz_length_mismatch(tmp_path: Path) -> None:
    _invalid(tmp_path, "x_train has 30 samples but y_train has 29 labels", y_train=np.arange(29) % 3)


def test_npz_empty_split(tmp_path: Path) -> None:
    _invalid(tmp_path, "the test split is empty", x_test=np.zeros((0, 40)), y_test=np.zeros(0, int))


def test_npz_non_finite(tmp_path: Path) -> None:
    x = _arrays()["x_test"]
    x[0, :2], x[1, 0] = np.nan, np.inf
    _invalid(tmp_path, r"x_test has 3 non-finite value\(s\) \(NaN or inf\)", x_test=x)


def test_npz_labels_not_from_zero_are_mapped_with_their_names(tmp_path: Path) -> None:
    arrays = _arrays() | {"y_train": np.arange(30) % 3 + 1, "y_test": np.arange(10) % 3 + 1}
    d = load_dataset("npz", path=_npz(tmp_path, **arrays))
    assert d.num_classes == 3 and d.class_names == ["1", "2", "3"]  # never padded to a 4th class
    assert torch.equal(d.y_test, torch.from_numpy(arrays["y_test"] - 1))


def test_npz_class_names_key(tmp_path: Path) -> None:
    names = np.array(["cat", "dog", "eel"])
    d = load_dataset("npz", path=_npz(tmp_path, **_arrays(), class_names=names))
    assert d.class_names == ["cat", "dog", "eel"]
    _invalid(tmp_path, "class_names has 2 names but the labels name 3 classes", class_names=names[:2])
    for bad in ("a\x00b", "\ud800", "tab\there", "", "x" * 201):  # stored and served back as JSON text
        _invalid(tmp_path, r"class_names\[1\] .* is not a name", class_names=np.array(["cat", bad, "eel"]))


def test_npz_test_label_unseen_in_train(tmp_path: Path) -> None:
    _invalid(tmp_path, r"label\(s\) -1 occur in y_test but not in y_train", y_test=np.arange(10) % 3 - 1)


def test_signals_keep_shifts_and_tabular_refuses_them(tmp_path: Path) -> None:
    d = load_dataset("npz", path=_npz(tmp_path, **_arrays(shape=(1, 40))))
    assert d.input_shape == (1, 40) and d.augmentation == "shift_noise"
    tab = load_dataset("npz", path=_npz(tmp_path, **_arrays()))
    with pytest.raises(ValueError, match=r"'shift_noise' does not fit inputs of shape \(40,\); valid"):
        tab.with_augmentation("shift_noise")
    noisy = tab.with_augmentation("feature_noise")
    x = noisy.x_train[:8]
    out = noisy.augment(x, torch.Generator().manual_seed(0))
    # small noise per feature, in units of each feature's std; nothing moves across features
    assert 0 < (out - x).abs().mean() < 0.2 * torch.tensor(noisy.std).mean()


def test_npz_single_class(tmp_path: Path) -> None:
    _invalid(tmp_path, "labels span only 1 class", y_train=np.zeros(30, int), y_test=np.zeros(10, int))


def test_npz_too_many_classes(tmp_path: Path) -> None:
    path = _npz(tmp_path, **_arrays())
    match = r"labels name 3 classes, over the limit of 2"
    with pytest.raises(DataValidationError, match=match):
        validate_npz(path, max_classes=2)


def test_npz_path_traversal(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in _arrays().items():
            buf = io.BytesIO()
            np.save(buf, v)
            zf.writestr(f"../{k}.npy" if k == "y_test" else f"{k}.npy", buf.getvalue())
    with pytest.raises(DataValidationError, match=r"zip member '\.\./y_test\.npy' has an unsafe path"):
        validate_npz(path)


def test_npz_total_size_cap(tmp_path: Path) -> None:
    path = _npz(tmp_path, **_arrays())
    with pytest.raises(DataValidationError, match="over the 1,000-byte limit .*zip bomb"):
        validate_npz(path, max_total_bytes=1000)


def test_npz_compression_ratio(tmp_path: Path) -> None:
    arrays = {**_arrays(), "x_train": np.zeros((30, 10_000), np.float32), "x_test": np.zeros((10, 10_000))}
    path = _npz(tmp_path, compressed=True, **arrays)
    with pytest.raises(DataValidationError, match=r"'x_train\.npy' has compression ratio \d+:1, over 200:1"):
        validate_npz(path)


def test_npz_header_larger_than_data(tmp_path: Path) -> None:
    # A forged header would make numpy allocate the declared size before reading anything.
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 40)})
    buf.write(b"\0" * 160)
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in _arrays().items():
            member = io.BytesIO()
            np.save(member, v)
            zf.writestr(f"{k}.npy", buf.getvalue() if k == "x_train" else member.getvalue())
    with pytest.raises(DataValidationError, match=r"array 'x_train' declares shape \(1000000000, 40\)"):
        validate_npz(path)


# --- CIFAR ---------------------------------------------------------------------------------------


def _pickle(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=4)


def _fake_cifar(root: Path, hundred: bool = False, per_file: int = 4) -> np.ndarray:
    """Write a tiny CIFAR folder in the official layout (bytes keys); returns the first batch's data."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = b"fine_labels" if hundred else b"labels"
    train = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    first = None
    for name in [*train, "test" if hundred else "test_batch"]:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        first = data if first is None else first
        labels = [int(v) for v in rng.integers(0, 100 if hundred else 10, size=per_file)]
        (folder / name).write_bytes(_pickle({b"data": data, label_key: labels, b"batch_label": b"x"}))
    n = 100 if hundred else 10
    names = [f"class{i}".encode() for i in range(n)]
    meta_key, meta_file = (b"fine_label_names", "meta") if hundred else (b"label_names", "batches.meta")
    (folder / meta_file).write_bytes(_pickle({meta_key: names}))
    return first


def test_cifar10_fake_folder_loads(tmp_path: Path) -> None:
    first = _fake_cifar(tmp_path)
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert (d.num_classes, d.class_names[3], d.augmentation) == (10, "class3", "crop_flip")
    # Channel-major rows: pixel (c, h, w) sits at c * 1024 + h * 32 + w.
    assert d.x_train[0, 2, 5, 7].item() == pytest.approx(first[0, 2 * 1024 + 5 * 32 + 7] / 255)
    assert d.mean == pytest.approx([0.4914, 0.4822, 0.4465])


def test_cifar100_from_tar_gz_and_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar(tmp_path / "src", hundred=True)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setenv("CMIM_DATA_DIR", str(tmp_path))
    d = load_dataset("cifar100")
    assert d.x_train.shape == (4, 3, 32, 32) and d.num_classes == 100 and len(d.class_names) == 100
    assert not os.path.exists(tmp_path / "cifar-100-python")  # read in memory, never extracted


def test_cifar_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path.resolve()) in msg and "Nothing is downloaded" in msg
    for f in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta", "cifar-10-python.tar.gz"):
        assert f"{f}" in msg
    assert "cifar-10-batches-py/batches.meta" in msg


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_cifar_unpickler_refuses_arbitrary_globals() -> None:
    assert np.array_equal(safe_unpickle(_pickle({b"a": np.arange(3)}))[b"a"], np.arange(3))
    assert np.array_equal(safe_unpickle(pickle.dumps(np.arange(3), protocol=5)), np.arange(3))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global"):
        safe_unpickle(_pickle({b"data": _Exploit()}))
