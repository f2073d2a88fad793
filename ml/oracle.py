"""The black-box teacher: what an attacker (or an honest user) gets back for a batch of inputs.

The audit attacks the teacher exactly as it will be served, so the service's predict endpoint and
the audit both go through `apply_output_mode`, and, when a serving policy protects the teacher,
through `ml.policy.serve` (which builds on the output modes here).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

if TYPE_CHECKING:
    from ml.policy import FittedPolicy, QueryHistory, Served


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


class QueryBudgetExceeded(RuntimeError):
    """A batch would take the oracle past its query budget; nothing of that batch was answered."""

    def __init__(self, budget: int, used: int, requested: int) -> None:
        self.budget, self.used, self.requested = budget, used, requested
        super().__init__(
            f"query budget of {budget} exceeded: {used} used, a batch of {requested} would make "
            f"{used + requested}"
        )


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


class Oracle:
    """Answers queries with the teacher's served output, counting every image (row) it answers.

    With a serving policy, one Oracle is one API key: it keeps the key's PRADA history, draws the
    perturbation noise from its own seeded generator, and counts refused and altered answers.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: OutputMode | None = None,
        budget: int | None = None,
        policy: FittedPolicy | None = None,
        seed: int = 0,
    ) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"query budget must be >= 0, got {budget}")
        self.model = model.eval()
        self.mode = mode if mode is not None else OutputMode()
        self.budget = budget
        self.queries = 0
        if policy is not None:  # centroids on the model's device once, not per batch
            device = next(model.parameters()).device
            policy = dataclasses.replace(policy, centroids=policy.centroids.to(device))
        self.policy = policy
        self.history: QueryHistory | None = policy.new_history() if policy is not None else None
        self.generator = torch.Generator().manual_seed(seed)
        self.last: Served | None = None
        self.refused_total = 0
        self.altered_total = 0

    @property
    def remaining(self) -> int | None:
        """Queries left before the budget is reached; None when there is no budget."""
        return None if self.budget is None else self.budget - self.queries

    def __call__(self, x: Tensor, logits: Tensor | None = None) -> Tensor:
        """(B, C) served answers for a batch of B inputs; raises QueryBudgetExceeded before answering.

        `logits`, when given, are this model's logits on `x` computed by the caller (the audit shares
        one forward pass among the black boxes that serve the same model differently).
        """
        from ml.policy import serve  # ml.policy imports this module

        n = int(x.shape[0])
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(self.budget, self.queries, n)
        # The model object may be shared with code that flips it to train mode; the black box always
        # answers as deployed (no dropout, frozen batch-norm statistics).
        if self.model.training:
            self.model.eval()
        with torch.no_grad():
            logits = (self.model(x) if logits is None else logits).float()
            probs = torch.softmax(logits, dim=-1)
            served = serve(probs, logits, self.mode, self.policy, self.history, x, self.generator)
        self.queries += n
        self.last = served
        if self.policy is not None:  # without a policy nothing is refused or altered (and no device sync)
            self.refused_total += int(served.refused.sum())
            self.altered_total += int(served.altered.sum())
        return served.answer
