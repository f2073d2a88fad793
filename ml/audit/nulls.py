"""The evidence null's independent models of other architectures, trained in a task of their own
(`ml.evidence.nulls` says which and why): per copy, the zoo families in one lockstep from that copy's seed,
scikit-learn ones fitted on a bootstrap drawn from it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ml.audit.config import AuditConfig
from ml.audit.lockstep import train_lockstep
from ml.audit.students import Run
from ml.data import Dataset
from ml.evidence.nulls import SKLEARN_NULLS, null_row, null_seed, sklearn_null


def train_nulls(
    families: list[str], data: Dataset, cfg: AuditConfig, seed: int,
    on_epoch: Callable[[int, int, int], None] | None = None,
) -> tuple[list[Run], Callable[[Tensor], Tensor]]:  # fmt: skip
    """`cfg.null_models` independent models per family for this seed (row `null_row(k)`, arch the family):
    (their runs, `predict(x)` -> (runs, N) labels). `on_epoch(k, epoch, epochs)`: copy k's progress."""
    runs: list[Run] = []
    predictors: list[Callable[[Tensor], Tensor]] = []  # each gives (its runs, N)
    for k in range(cfg.null_models):
        zoo = [Run(null_row(k), f) for f in families if f not in SKLEARN_NULLS]
        if zoo:
            tick = None if on_epoch is None else lambda e, n, k=k: on_epoch(k, e, n)
            predictors.append(train_lockstep(zoo, data, {}, cfg, null_seed(seed, k), on_epoch=tick))
            runs += zoo
        for f in (f for f in families if f in SKLEARN_NULLS):
            predict_one, acc = sklearn_null(f, data, null_seed(seed, k))
            runs.append(Run(null_row(k), f, acc=[acc]))
            predictors.append(lambda x, p=predict_one: p(x)[None])

    def predict(x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in predictors])

    return runs, predict
