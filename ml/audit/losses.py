"""The summed loss of a stacked group's students in a few calls, not one per student.

Every LS student's loss and every row-separable attack's loss is a mean over the batch's rows, so
the students of one LS kind (plain or mixup) or one attack row (the same attack and parameters,
against any black box) are one call on their logits stacked along the rows: k students' summed
loss is k times the loss of the stacked rows. Other attacks (learned parameters, batch statistics)
keep one call each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ml.attacks import Attack, AttackContext
from ml.audit.batches import Batch
from ml.audit.students import Run, attacker_targets, student_loss

Served = dict[str, dict[str, Tensor]]


def smoothed_ce(logits: Tensor, y: Tensor, eps: Tensor) -> Tensor:
    """Per student and row, label-smoothed CE: logits (k, n, C), y (n,), eps (k,) -> (k, n).

    (1 - eps) (-log p_y) + eps mean_c (-log p_c), which is PyTorch's cross_entropy(label_smoothing=eps).
    """
    log_p = torch.log_softmax(logits, dim=-1)
    nll = -log_p.gather(-1, y.expand(len(logits), -1)[..., None]).squeeze(-1)
    return (1 - eps[:, None]) * nll + eps[:, None] * -log_p.mean(-1)


def separable(attack: Attack) -> bool:
    """Attacks whose loss is a mean over rows of per-row terms, with no parameters of their own."""
    return attack.row_separable and not attack.needs_features and not any(True for _ in attack.parameters())


class StackedLoss:
    """The loss calls of one stacked group, planned once from its runs and slots."""

    def __init__(self, runs: list[Run], slots: list[tuple[int, str]], device: torch.device) -> None:
        slot = {iv: s for s, iv in enumerate(slots)}
        self.runs = runs
        self.ls: list[tuple[bool, Tensor, Tensor]] = []  # (mixup, slot indices, eps)
        for mixup in (False, True):
            members = [i for i, r in enumerate(runs) if r.attack is None and r.mixup == mixup]
            if members:
                view = "mixup" if mixup else "plain"
                idx = torch.tensor([slot[(i, view)] for i in members], device=device)
                eps = torch.tensor([runs[i].eps for i in members], device=device)
                self.ls.append((mixup, idx, eps))
        rows: dict[tuple[type, object], list[int]] = {}
        self.single: list[int] = []
        for i, r in enumerate(runs):
            if r.attack is None:
                continue
            if separable(r.attack):
                rows.setdefault((type(r.attack), r.attack.params), []).append(i)
            else:
                self.single.append(i)
        self.rows = [
            (members, _slot_indices(slot, members, runs[members[0]].views, device))
            for members in rows.values()
        ]
        self.slot = slot

    def __call__(self, logits: Tensor, served: Served, batch: Batch, ctx: AttackContext) -> Tensor:
        """The summed loss of every run; logits (slots, batch, classes) from StackedGroup.logits."""
        n, y = batch.labelled, batch.y[: batch.labelled]
        total = torch.zeros((), device=logits.device)
        for mixup, idx, eps in self.ls:  # LS students learn from the labelled rows only (they come first)
            z = logits[idx, :n]
            if mixup:  # lam CE(y) + (1 - lam) CE(y[perm]), per-sample lam: both terms are LS CEs
                perm, lam = (t[:n] for t in batch.mix["mixup"])
                a, b = smoothed_ce(z, y, eps), smoothed_ce(z, y[perm], eps)
                total = total + (lam * a + (1 - lam) * b).mean(-1).sum()
            else:
                total = total + smoothed_ce(z, y, eps).mean(-1).sum()
        for members, views in self.rows:
            runs = [self.runs[i] for i in members]
            k, attack = len(members), runs[0].attack
            assert attack is not None
            student = {v: logits[idx].flatten(0, 1) for v, idx in views.items()}
            answers = {v: torch.cat([served[r.teacher][v] for r in runs]) for v in views}  # type: ignore[index]
            targets = torch.cat([attacker_targets(served[r.teacher], batch) for r in runs])  # type: ignore[index]
            total = total + k * sum(attack(student, answers, targets, ctx).values())
        for i in self.single:
            run = self.runs[i]
            out = {v: logits[self.slot[(i, v)]] for v in run.views}
            total = total + student_loss(run, out, served, batch, ctx)
        return total


def _slot_indices(
    slot: dict[tuple[int, str], int], members: list[int], views: tuple[str, ...], device: torch.device
) -> dict[str, Tensor]:
    return {v: torch.tensor([slot[(i, v)] for i in members], device=device) for v in views}
