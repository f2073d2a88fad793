"""The black-box teacher: what an attacker (or an honest user) gets back for a batch of inputs.

The audit attacks the teacher exactly as it will be served, so the service's predict endpoint and
the audit both format answers with `apply_output_mode` (`ml.output_mode`) and, when a serving policy
protects the teacher, decide them with `ml.policy.serve`. This module is the entry point for both.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ml.output_mode import OutputMode, apply_output_mode
from ml.policy import FittedPolicy, QueryHistory, Served, serve_model

__all__ = ["Oracle", "OutputMode", "QueryBudgetExceeded", "apply_output_mode"]


class QueryBudgetExceeded(RuntimeError):
    """A batch would take the oracle past its query budget; nothing of that batch was answered."""

    def __init__(self, budget: int, used: int, requested: int) -> None:
        self.budget, self.used, self.requested = budget, used, requested
        super().__init__(
            f"query budget of {budget} exceeded: {used} used, a batch of {requested} would make "
            f"{used + requested}"
        )


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
        n = int(x.shape[0])
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(self.budget, self.queries, n)
        served = serve_model(self.model, x, self.mode, self.policy, self.history, self.generator, logits)
        self.queries += n
        self.last = served
        if self.policy is not None:  # without a policy nothing is refused or altered (and no device sync)
            self.refused_total += int(served.refused.sum())
            self.altered_total += int(served.altered.sum())
        return served.answer
