"""Batched, vectorised training-time augmentations (no per-sample Python loop)."""

from __future__ import annotations

import torch

AUGMENTATIONS = ("shift_noise", "crop_flip", "feature_noise", "none")
# Which augmentations fit which inputs (one example's rank): shifts and crops move values across
# positions, which is meaningless (and harmful) between the unrelated columns of tabular data.
FITS_RANK = {"shift_noise": (2,), "crop_flip": (3,), "feature_noise": (1, 2, 3), "none": (1, 2, 3)}
FEATURE_NOISE = 0.05  # feature_noise: Gaussian noise of this many per-feature standard deviations


def _randint(high: int, n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """n integers in [0, high) drawn on the generator's device, returned on x's device."""
    # Drawing on the generator's own device keeps a CPU generator usable for CUDA batches.
    device = generator.device if generator is not None else x.device
    return torch.randint(0, high, (n,), generator=generator, device=device).to(x.device)


def shift_noise(
    x: torch.Tensor, generator: torch.Generator | None = None, max_shift: int = 3, noise_std: float = 0.02
) -> torch.Tensor:
    """Per-sample circular shift in [-max_shift, max_shift] on the last axis plus N(0, noise_std) noise."""
    n, length = x.shape[0], x.shape[-1]
    shift = _randint(2 * max_shift + 1, n, x, generator) - max_shift
    # out[..., i] = x[..., (i - s) % L], i.e. torch.roll by s, for every sample at once.
    idx = (torch.arange(length, device=x.device) - shift[:, None]) % length
    idx = idx.view(n, *([1] * (x.dim() - 2)), length).expand_as(x)
    out = torch.gather(x, -1, idx)
    if noise_std > 0:
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        out = out + noise_std * noise
    return out


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Random crop back to (H, W) from a zero-padded (N, C, H, W) batch, then a horizontal flip with p=0.5."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    top = _randint(2 * padding + 1, n, x, generator)
    left = _randint(2 * padding + 1, n, x, generator)
    flip = _randint(2, n, x, generator).bool()
    rows = top[:, None] + torch.arange(h, device=x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Advanced indexing gathers every sample's own window (and flip) in one call.
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def feature_noise(
    x: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x + N(0, (FEATURE_NOISE * std)^2) per feature (std along axis 1); nothing moves across features."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    scale = std.to(x.device, x.dtype).view((-1,) + (1,) * (x.dim() - 2))
    return x + FEATURE_NOISE * scale * noise


def check_augmentation(kind: str, input_shape: tuple[int, ...]) -> None:
    """ValueError when `kind` is unknown or does not fit inputs of this shape (e.g. shifts on tabular)."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; valid choices: {', '.join(AUGMENTATIONS)}")
    if len(input_shape) not in FITS_RANK[kind]:
        fits = [a for a in AUGMENTATIONS if len(input_shape) in FITS_RANK[a]]
        raise ValueError(
            f"augmentation {kind!r} does not fit inputs of shape {tuple(input_shape)}; "
            f"valid choices for them: {', '.join(fits)}"
        )


def augment_batch(
    kind: str,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_std: float = 0.02,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Augment batch x with `kind` (one of AUGMENTATIONS); deterministic given generator.

    `std` (per feature or channel) scales feature_noise; without it the noise is in units of 1."""
    if kind == "shift_noise":
        return shift_noise(x, generator, noise_std=noise_std)
    if kind == "crop_flip":
        return crop_flip(x, generator)
    if kind == "feature_noise":
        return feature_noise(x, torch.ones(1) if std is None else std, generator)
    if kind == "none":
        return x
    raise ValueError(f"unknown augmentation {kind!r}; valid choices: {', '.join(AUGMENTATIONS)}")
