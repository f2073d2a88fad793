"""One student run (an LS row or an attack row against one black box) and its training loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ml.attacks import Attack, AttackContext
from ml.audit.batches import Batch


@dataclass
class Run:
    """One student: an LS row (attack None) or an attack row against one teacher."""

    name: str
    arch: str
    teacher: str | None = None  # key into the oracles; None for LS students
    attack: Attack | None = None
    eps: float = 0.0
    mixup: bool = False
    acc: list[float] = field(default_factory=list)  # test accuracy at each evaluated epoch
    fidelity: float = float("nan")

    @property
    def views(self) -> tuple[str, ...]:
        if self.attack is None:
            return ("mixup",) if self.mixup else ("plain",)
        return self.attack.views


def student_loss(
    run: Run, out: dict[str, Tensor], served: dict[str, dict[str, Tensor]], batch: Batch, ctx: AttackContext
) -> Tensor:
    if run.attack is None:  # LS students learn from the labelled rows only (they come first)
        n, y = batch.labelled, batch.y[: batch.labelled]
        if run.mixup:  # mixup CE: lam CE(y) + (1 - lam) CE(y[perm]), per-sample lam
            z, (perm, lam) = out["mixup"][:n], (t[:n] for t in batch.mix["mixup"])
            ce_a = F.cross_entropy(z, y, label_smoothing=run.eps, reduction="none")
            ce_b = F.cross_entropy(z, y[perm], label_smoothing=run.eps, reduction="none")
            return (lam * ce_a + (1 - lam) * ce_b).mean()
        return F.cross_entropy(out["plain"][:n], y, label_smoothing=run.eps)
    answers = served[run.teacher]
    return sum(run.attack(out, answers, attacker_targets(answers, batch), ctx).values())


def attacker_targets(answers: dict[str, Tensor], batch: Batch) -> Tensor:
    """The attacker's labels: its own on labelled rows, the answer's argmax on unlabelled transfer rows."""
    if batch.labelled == len(batch.y):
        return batch.y
    guess = answers.get("plain", next(iter(answers.values()))).argmax(-1)
    return torch.where(batch.y >= 0, batch.y, guess)
