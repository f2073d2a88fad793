"""Output modes: how the served answer is derived from the teacher's probabilities (pure functions).

The service's predict endpoint, the audit's black boxes and the serving policies (`ml.policy`) all
format answers through `apply_output_mode`; `ml.oracle` is the entry point that exposes it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor


class OutputMode(BaseModel):
    """How the served answer is derived from the teacher's probabilities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["probs", "topk", "label", "rounded"] = Field(
        "probs",
        description="probs: full probabilities; topk: the k largest, renormalised; label: one-hot of "
        "the argmax; rounded: probabilities rounded to `decimals` decimals, renormalised",
    )
    k: int = Field(5, ge=1, le=100_000, description="topk: how many classes keep their probability")
    decimals: int = Field(
        2, ge=0, le=6, description="rounded: decimals kept (float32 holds about 7 significant digits)"
    )

    def words(self) -> str:
        """The mode as a user would say it, e.g. 'labels only' or 'top-3 probabilities'."""
        return {
            "probs": "full probabilities",
            "topk": f"top-{self.k} probabilities",
            "label": "labels only",
            "rounded": f"probabilities rounded to {self.decimals} decimals",
        }[self.kind]


def topk_renormalise(probs: Tensor, k: int) -> Tensor:
    """Keep the k largest probabilities of each row, renormalised to sum 1; the others become 0."""
    k = min(k, probs.shape[-1])
    values, index = probs.topk(k, dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, index, values)
    return kept / kept.sum(-1, keepdim=True)


def one_hot_argmax(probs: Tensor) -> Tensor:
    """One-hot rows of the argmax (the first one on ties), in the dtype of `probs`."""
    return F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)


def apply_output_mode(probs: Tensor, mode: OutputMode) -> Tensor:
    """What is served for (B, C) probabilities under `mode`, as a (B, C) tensor (pure)."""
    if mode.kind == "probs":
        return probs
    if mode.kind == "topk":
        return topk_renormalise(probs, mode.k)
    if mode.kind == "label":
        return one_hot_argmax(probs)
    rounded = torch.round(probs, decimals=mode.decimals)
    total = rounded.sum(-1, keepdim=True)
    # A row can round to all zeros (many classes, few decimals): serving its label is the nearest
    # honest answer, and it keeps every served row a distribution.
    renormalised = rounded / total.clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.where(total > 0, renormalised, one_hot_argmax(probs))
