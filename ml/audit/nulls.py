"""The evidence null's independent models of other architectures, trained in a task's unlimited phase
(`ml.evidence.nulls` says which and why): zoo families in one lockstep of their own, after the audit's
students (so none of their figures changes), scikit-learn ones fitted on a bootstrap."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ml.audit.config import AuditConfig
from ml.audit.lockstep import train_lockstep
from ml.audit.students import Run
from ml.data import Dataset
from ml.evidence.nulls import NULL_ROW, SKLEARN_NULLS, sklearn_null


def train_nulls(
    families: list[str], data: Dataset, cfg: AuditConfig, seed: int
) -> tuple[list[Run], Callable[[Tensor], Tensor]]:
    """One independent model per family for this seed: (their runs, `predict(x)` -> (runs, N) labels)."""
    zoo = [Run(NULL_ROW, f) for f in families if f not in SKLEARN_NULLS]
    predict_zoo = train_lockstep(zoo, data, {}, cfg, seed) if zoo else None
    runs, fitted = list(zoo), []
    for f in (f for f in families if f in SKLEARN_NULLS):
        predict_one, acc = sklearn_null(f, data, seed)
        runs.append(Run(NULL_ROW, f, acc=[acc]))
        fitted.append(predict_one)

    def predict(x: Tensor) -> Tensor:
        parts = [] if predict_zoo is None else [predict_zoo(x)]
        return torch.cat([*parts, *(p(x)[None] for p in fitted)])

    return runs, predict
