"""The model zoo: parameter counts, shapes, input normalisation, shape errors and vmap-ability."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from ml.models import MODELS, Normalize, build_model, count_parameters, model_infos
from ml.registry import UnknownNameError

EXAMPLE_SHAPE = {"any": (1, 40), "1d": (1, 40), "2d": (3, 32, 32)}
KINDS = {info.name: info.kind for info in model_infos()}

# CRD (Tian et al. 2020) Table 1 / mdistiller figures at 100 classes (CIFAR-100).
PUBLISHED_CIFAR100 = {
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "wrn_40_2": 2.26e6,
    "wrn_16_2": 0.70e6,
    "resnet56": 0.86e6,
    "resnet110": 1.73e6,
    "resnet20": 0.28e6,
    "vgg13": 9.46e6,
    "mobilenetv2": 0.81e6,
    "shufflenetv2": 1.36e6,
}
VMAP_MODELS = ["mlp", "cnn1d", "cnn1d_small", "cnn2d"]


def test_registry_holds_the_whole_zoo() -> None:
    expected = {"mlp", "cnn1d", "cnn1d_small", "cnn2d", "mobilenetv2", "shufflenetv2"}
    expected |= {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)} | {"resnet8x4", "resnet32x4"}
    expected |= {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16"}
    assert set(MODELS.names()) == expected
    assert [info.name for info in model_infos()] == MODELS.names()
    assert all(info.description and info.kind in EXAMPLE_SHAPE for info in model_infos())


@pytest.mark.parametrize(("name", "expected"), [("mlp", 23_050), ("cnn1d", 113_738), ("cnn1d_small", 12_618)])
def test_small_model_counts_on_mnist1d(name: str, expected: int) -> None:
    assert count_parameters(build_model(name, (1, 40), 10)) == expected


@pytest.mark.parametrize(("name", "published"), sorted(PUBLISHED_CIFAR100.items()))
def test_cifar_counts_match_published(name: str, published: float) -> None:
    assert count_parameters(build_model(name, (3, 32, 32), 100)) == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_gives_logits(name: str) -> None:
    shape = EXAMPLE_SHAPE[KINDS[name]]
    model = build_model(name, shape, 7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn2d", (1, 8, 8)),
        ("cnn2d", (1, 28, 28)),
        ("cnn1d", (2, 33)),
        ("cnn1d_small", (1, 100)),
        ("mlp", (3, 8, 8)),
        ("resnet8", (1, 36, 48)),
        ("vgg8", (3, 64, 64)),
        ("shufflenetv2", (3, 40, 32)),
    ],
)
def test_other_input_shapes(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 4).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 4)


def test_normalize_is_applied_and_saved() -> None:
    torch.manual_seed(0)
    raw = build_model("cnn1d", (2, 16), 3)
    normed = build_model("cnn1d", (2, 16), 3, mean=[1.0, -2.0], std=[0.5, 4.0])
    normed[1].load_state_dict(raw[1].state_dict())
    x = torch.randn(5, 2, 16)
    expected = raw[1]((x - torch.tensor([1.0, -2.0]).view(1, 2, 1)) / torch.tensor([0.5, 4.0]).view(1, 2, 1))
    torch.testing.assert_close(normed(x), expected)
    assert not torch.allclose(normed(x), raw(x))
    # The statistics are part of the checkpoint, so the saved model takes raw inputs.
    assert {"0.mean", "0.std"} <= set(normed.state_dict())


def test_normalize_identity_and_broadcast() -> None:
    x = torch.randn(4, 3, 5, 5)
    assert Normalize()(x) is x
    assert Normalize(None, None).state_dict() == {}
    torch.testing.assert_close(Normalize([0.5], [2.0])(x), (x - 0.5) / 2.0)
    torch.testing.assert_close(Normalize([1.0, 2.0, 3.0])(x), x - torch.arange(1.0, 4.0).view(1, 3, 1, 1))


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("resnet8x4", (1, 40), "model 'resnet8x4' needs image inputs (C, H, W); got input shape (1, 40)"),
        ("cnn1d", (3, 32, 32), "model 'cnn1d' needs sequence inputs (C, L); got input shape (3, 32, 32)"),
        ("vgg8", (1, 28, 28), "model 'vgg8' needs images of at least 32x32; got input shape (1, 28, 28)"),
        ("cnn2d", (1, 4, 8), "model 'cnn2d' needs images of at least 8x8; got input shape (1, 4, 8)"),
        ("mlp", (0, 40), "model 'mlp' needs a non-empty input shape of positive sizes; got (0, 40)"),
    ],
)
def test_incompatible_shape_is_a_clear_error(name: str, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_model(name, shape, 10)
    assert str(err.value) == message


def test_bad_normalization_is_rejected() -> None:
    with pytest.raises(ValueError, match="mean/std give 2 channels"):
        build_model("cnn2d", (3, 8, 8), 10, mean=[0.1, 0.2], std=[1.0, 1.0])
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.0], [0.0])


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(UnknownNameError) as err:
        build_model("resnet9000", (3, 32, 32), 10)
    assert all(word in str(err.value) for word in ("resnet9000", "resnet8x4", "cnn1d_small"))


@pytest.mark.parametrize("name", VMAP_MODELS)
def test_small_models_train_as_a_vmapped_population(name: str) -> None:
    torch.manual_seed(0)
    shape = (1, 40) if KINDS[name] != "2d" else (1, 8, 8)
    copies = [build_model(name, shape, 10, mean=[0.3], std=[1.7]) for _ in range(3)]
    params, buffers = stack_module_state(copies)
    base = copy.deepcopy(copies[0]).to("meta")
    x = torch.randn(6, *shape)

    def forward(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (xb,))

    population = vmap(forward, in_dims=(0, 0, None))
    out = population(params, buffers, x)
    assert out.shape == (3, 6, 10)
    torch.testing.assert_close(out, torch.stack([m(x) for m in copies]))
    # Gradients flow through the vmapped population too (what the audit's training step needs).
    grads = torch.func.grad(lambda p: population(p, buffers, x).square().sum())(params)
    assert all(g.shape == params[k].shape and torch.isfinite(g).all() for k, g in grads.items())
