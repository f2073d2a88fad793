"""The black boxes an attacker queries (a teacher served through an output mode and policy) and their
summaries: teacher accuracy and I_T curves, serving cost to honest users."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.audit.config import CMI_CURVE_TEMPERATURES
from ml.audit.stats import summarise
from ml.cmi import cmi_by_temperature, model_logits
from ml.data import Dataset
from ml.evidence.secret import Secret
from ml.oracle import Oracle, OutputMode
from ml.policy import FittedPolicy, PolicyConfig, fit_policy, honest_cost
from ml.train import accuracy


@dataclass
class BlackBox:
    """What an attacker queries: a teacher (one per seed, or one for all) served through an output mode
    and, optionally, a fitted serving policy (one per seed, or one for all)."""

    models: list[nn.Module]
    mode: OutputMode = field(default_factory=OutputMode)
    policies: list[Any] | None = None

    def oracle(self, seed_index: int, device: torch.device) -> Oracle:
        model = self.models[seed_index % len(self.models)].to(device).eval()
        if self.policies is None:
            return Oracle(model, self.mode)
        return Oracle(
            model, self.mode, policy=self.policies[seed_index % len(self.policies)], seed=seed_index
        )


def serve_box(
    models: list[nn.Module],
    mode: OutputMode,
    policy: PolicyConfig,
    data: Dataset,
    secret: Secret | None = None,
) -> BlackBox:
    """A black box serving `models` through `mode` and `policy`, the policy fitted to each model (keyed
    answers drawn from the evidence `secret`).

    Centroids come from the training split; per-query detector thresholds are calibrated on the first
    half of the test split (held-out clean inputs: on the training inputs a teacher is over-confident
    and the flag rate would be under-estimated); the honest-user cost is measured on the second half.
    """
    if policy == PolicyConfig():
        return BlackBox(models, mode)
    calib = data.x_test[: len(data.x_test) // 2]
    return BlackBox(
        models, mode, [fit_policy(policy, m, data.x_train, data.y_train, calib, secret) for m in models]
    )


def serving_summary(box: BlackBox, data: Dataset) -> dict[str, Any]:
    """The served output mode and policy, and what they cost honest users (means over per-seed teachers)."""
    half = len(data.x_test) // 2
    x, y = data.x_test[half:], data.y_test[half:]
    policies: list[FittedPolicy | None] = box.policies or [None] * len(box.models)
    costs = [honest_cost(m, box.mode, p, x, y) for m, p in zip(box.models, policies, strict=False)]
    return {
        "output_mode": box.mode.model_dump(),
        "policy": box.policies[0].config.model_dump() if box.policies else PolicyConfig().model_dump(),
        "honest_cost": {k: float(np.mean([c[k] for c in costs])) for k in costs[0]},
    }


def as_models(m: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [m] if isinstance(m, nn.Module) else list(m)


def teacher_summary(models: nn.Module | Sequence[nn.Module], data: Dataset) -> dict[str, Any]:
    """Accuracy and I_T curves of a teacher (means over the per-seed teachers when several)."""
    ms = as_models(models)
    per = []
    for m in ms:
        logits = model_logits(m, data.x_test)
        per.append(
            {
                "accuracy": accuracy(logits, data.y_test),
                "cmi_test": cmi_by_temperature(logits, data.y_test, CMI_CURVE_TEMPERATURES),
                "cmi_train": cmi_by_temperature(
                    model_logits(m, data.x_train), data.y_train, CMI_CURVE_TEMPERATURES
                ),
            }
        )
    out: dict[str, Any] = {
        "accuracy": float(np.mean([p["accuracy"] for p in per])),
        "cmi_test": {t: float(np.mean([p["cmi_test"][t] for p in per])) for t in per[0]["cmi_test"]},
        "cmi_train": {t: float(np.mean([p["cmi_train"][t] for p in per])) for t in per[0]["cmi_train"]},
    }
    if len(per) > 1:
        out["accuracy_stats"] = summarise([p["accuracy"] for p in per])
    return out
