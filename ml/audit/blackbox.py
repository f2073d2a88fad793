"""The black boxes an attacker queries (a teacher served through an output mode and policy) and their
summaries: teacher accuracy and I_T curves, serving cost to honest users. A teacher that runs elsewhere
(an owner's deployed model) is an `AnsweringModel`: a callable asked for each distinct input once, and
`deployed_phases` says which of the audit's phases an owner's query cap allows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.attacks import ATTACKS
from ml.audit.config import CMI_CURVE_TEMPERATURES, AuditConfig
from ml.audit.stats import summarise
from ml.cmi import cmi_by_temperature, model_logits
from ml.data import Dataset
from ml.evidence.secret import Secret
from ml.oracle import Oracle, OutputMode
from ml.policy import FittedPolicy, PolicyConfig, fit_policy, honest_cost
from ml.train import accuracy


class AnsweringModel(nn.Module):
    """A teacher that runs elsewhere: `answer` maps a batch of inputs (numpy) to their (n, C) logits.

    Each distinct input (by the sha256 of its bytes) is asked once; asked again, in another epoch, view,
    phase or seed, its answer is remembered. `asked` counts the rows handed to `answer`."""

    def __init__(self, answer: Callable[[np.ndarray], np.ndarray], num_classes: int) -> None:
        super().__init__()
        self.answer, self.num_classes = answer, num_classes
        self.known: dict[bytes, np.ndarray] = {}
        self.asked = 0
        # no weights; a parameter says which device its answers go to
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().cpu().float().contiguous().numpy()
        keys = [hashlib.sha256(r.tobytes()).digest() for r in rows]
        new = list(dict.fromkeys(k for k in keys if k not in self.known))
        if new:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            got = np.asarray(self.answer(rows[[first[k] for k in new]]), dtype=np.float32)
            if got.shape != (len(new), self.num_classes):
                raise ValueError(f"the teacher answered shape {got.shape} for {len(new)} inputs")
            self.known.update(zip(new, got, strict=True))
            self.asked += len(new)
        out = np.stack([self.known[k] for k in keys]) if keys else np.zeros((0, self.num_classes), np.float32)
        return torch.from_numpy(out).to(x.device)


@dataclass(frozen=True)
class DeployedPhases:
    """The phases an owner's query cap allows an audit of a deployed model, and the rows they may ask at
    most (every input asked once per phase and view: an upper bound, since answers are remembered)."""

    budgets: list[int]  # the budget phases run
    skipped: list[int]  # the budget phases the cap did not allow
    needed: int  # what the teacher's summaries and the unlimited phase ask
    most_queries: int  # what the phases run ask at most
    unlimited: bool = True  # whether the cap pays for the unlimited phase
    least: int = 0  # the smallest cap that pays for the summaries and one phase

    @property
    def runs_any(self) -> bool:
        """Whether the cap pays for any phase at all (without one there is no verdict)."""
        return self.unlimited or bool(self.budgets)


def deployed_phases(
    cfg: AuditConfig, n_train: int, n_test: int, labelled: int, cap: int, *, fixed_plain: bool = False
) -> DeployedPhases:
    """The phases that fit the cap: the teacher's summaries (its answers on the train and test splits),
    then the unlimited phase when the cap allows it, then the budget phases, cheapest first. Without the
    unlimited phase the verdict rests on the largest budget run. `fixed_plain`: the plain view is the
    training inputs themselves (no augmentation), already asked for the summaries."""
    per_row = [ATTACKS.get(key).views for _, key, _ in cfg.attack_rows()]
    free = {"plain"} if fixed_plain and not cfg.transfer else set()

    def views(group: list[tuple[str, ...]]) -> int:
        return len({v for vs in group for v in vs} - free)

    def budget_cost(b: int) -> int:
        groups = {len(vs) for vs in per_row}
        return cfg.seeds * sum(
            (max(b // n, 1) + cfg.batch_size) * views([vs for vs in per_row if len(vs) == n]) for n in groups
        )

    transfer = 2 if cfg.transfer else 1  # as many transfer inputs as labelled ones per batch
    summaries = n_train + n_test
    needed = summaries + cfg.seeds * cfg.epochs * labelled * transfer * views(per_row)
    budgets = sorted(cfg.budgets(labelled))
    least = summaries + min([needed - summaries, *(budget_cost(b) for b in budgets)])
    unlimited = needed <= cap
    spent, run, skipped = needed if unlimited else summaries, [], []
    for b in budgets:
        cost = budget_cost(b)
        if spent + cost <= cap:
            spent += cost
            run.append(b)
        else:
            skipped.append(b)
    return DeployedPhases(run, skipped, needed, spent, unlimited, least)


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
