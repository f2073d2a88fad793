"""Batched, vectorised training-time augmentations (no per-sample Python loop)."""

from __future__ import annotations

import torch

AUGMENTATIONS = ("shift_noise", "crop_flip", "none")


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


def augment_batch(
    kind: str, x: torch.Tensor, generator: torch.Generator | None = None, noise_std: float = 0.02
) -> torch.Tensor:
    """Augment batch x with `kind` ("shift_noise" | "crop_flip" | "none"); deterministic given generator."""
    if kind == "shift_noise":
        return shift_noise(x, generator, noise_std=noise_std)
    if kind == "crop_flip":
        return crop_flip(x, generator)
    if kind == "none":
        return x
    raise ValueError(f"unknown augmentation {kind!r}; valid choices: {', '.join(AUGMENTATIONS)}")
