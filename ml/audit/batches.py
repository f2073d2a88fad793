"""Shared batches: every input view a student or attack asks for, built once per batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ml.audit.config import AuditConfig
from ml.data import Dataset


@dataclass
class Batch:
    y: Tensor  # -1 on unlabelled transfer rows, which come after the `labelled` labelled ones
    views: dict[str, Tensor]
    mix: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # mixed view -> (partner, ratio)
    labelled: int = -1

    def __post_init__(self) -> None:
        if self.labelled < 0:
            self.labelled = len(self.y)


# Every input view a student or attack can ask for, each drawn from its own generator (seeded per seed).
VIEWS = ("plain", "mixup", "strong", "mixup_edge", "noise")


def view_generators(seed: int) -> dict[str, torch.Generator]:
    # the first three keep their seeds of earlier revisions, so their numbers reproduce
    seeds = [seed * 3 + i if i < 3 else 2**21 * i + seed for i in range(len(VIEWS))]
    return {v: torch.Generator().manual_seed(n) for v, n in zip(VIEWS, seeds, strict=True)}


def make_batch(
    data: Dataset, x: Tensor, y: Tensor, needed: set[str], cfg: AuditConfig, gens: dict[str, torch.Generator]
) -> Batch:
    """The batch's views; each extra view draws from its own generator, so the plain batches of a
    seed do not depend on which other views the students need."""
    plain = data.augment(x, gens["plain"]) if cfg.augment else x
    batch = Batch(y=y, views={"plain": plain}, labelled=int((y >= 0).sum()))
    n, nl, shape = len(x), batch.labelled, (len(x),) + (1,) * (x.dim() - 1)
    for view in ("mixup", "mixup_edge"):  # a mix of two augmented inputs, a ratio per sample
        if view not in needed:
            continue
        g = gens[view]
        # labelled rows mix with labelled rows (LS-mixup needs both labels), transfer rows with transfer rows
        perm = torch.cat([torch.randperm(nl, generator=g), nl + torch.randperm(n - nl, generator=g)])
        if view == "mixup_edge":  # close to one real input: ratio ~ U(edge_range)
            low, high = cfg.edge_range
            lam = low + (high - low) * torch.rand(n, generator=g)
        elif cfg.mixup_alpha == 1:  # ratio ~ Beta(alpha, alpha)
            lam = torch.rand(n, generator=g)
        else:  # the Beta sampler takes no generator: it draws from the global RNG, seeded per seed
            lam = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample((n,))
        perm, lam = perm.to(x.device), lam.to(x.device)
        batch.mix[view] = (perm, lam)
        batch.views[view] = lam.view(shape) * plain + (1 - lam.view(shape)) * plain[perm]
    if "noise" in needed:  # a real input plus Gaussian noise of noise_scale data stds
        std = torch.tensor(data.std, dtype=x.dtype).view((1, -1) + (1,) * (x.dim() - 2)).to(x.device)
        noise = torch.randn(plain.shape, generator=gens["noise"]).to(x.device)
        batch.views["noise"] = plain + cfg.noise_scale * std * noise
    if "strong" in needed:  # a second, stronger view: augmentation twice plus extra noise
        g = gens["strong"]
        strong = data.augment(data.augment(x, g), g) if cfg.augment else x
        batch.views["strong"] = strong + 0.1 * torch.randn(strong.shape, generator=g).to(x.device)
    return batch
