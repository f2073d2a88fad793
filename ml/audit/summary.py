"""What the report needs of a plan's models, computed once where the models are: the plan summary.

`summarise_plan(plan)` measures every served black box (accuracy, I_T curves, honest-user cost; the
keyed answers' cost) and keeps the plan's shape (rows, tasks, budgets, the evidence commitment).
`ml.audit.report.assemble(summary, results)` needs nothing else: no model, no data, no forward pass,
so whoever holds the summary (the chord callback of a fanned-out job) assembles the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ml.audit.blackbox import serving_summary, teacher_summary
from ml.audit.config import AuditConfig
from ml.audit.result import DatasetInfo, ServedSummary
from ml.evidence.audit import keyed_costs

if TYPE_CHECKING:
    from ml.audit.tasks import AuditPlan


class TaskRef(BaseModel):
    """A task of the plan as the assembly knows it: its key, its place and its work in epochs."""

    seed_index: int
    phase: int | None
    key: str
    epochs: int

    def describe(self, seeds: int) -> str:
        budget = "" if self.phase is None else f", budget {self.phase}"
        return f"seed {self.seed_index + 1}/{seeds}{budget}"


class PlanSummary(BaseModel):
    """Everything `assemble` reads of a plan: JSON, so it travels with a fanned-out audit's hand-off."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    fingerprint: str
    cfg: AuditConfig  # query budgets resolved
    dataset: DatasetInfo  # as given: the served models are measured on it
    labelled_samples: int  # the attacker's share of the train split
    transfer_samples: int | None  # None: no transfer set
    served: dict[str, ServedSummary]  # "teacher", "control" and the named protections
    compares_raw: bool  # the teacher is also attacked served with full probabilities
    protections: list[str]
    budget_teachers: list[str]
    ls_names: list[str]  # the LS rows, in plan order
    attack_names: list[str]  # the attack rows, in plan order
    tasks: list[TaskRef]  # in plan (seed) order
    commitment: dict[str, str] | None = None  # the evidence secret's; None: no evidence measured
    keyed_costs: dict[str, dict[str, float]] = Field(default_factory=dict)

    @property
    def total_epochs(self) -> int:
        return sum(t.epochs for t in self.tasks)


def summarise_plan(p: AuditPlan) -> PlanSummary:
    """The plan's summary: its served black boxes measured once (boxes serving one model share it)."""
    dataset = p.dataset
    measured: dict[tuple[int, ...], dict[str, Any]] = {}

    def served(name: str) -> ServedSummary:
        box = p.teachers[name]
        key = tuple(id(m) for m in box.models)
        if key not in measured:
            measured[key] = teacher_summary(box.models, dataset)
        return ServedSummary.model_validate({**measured[key], "serving": serving_summary(box, dataset)})

    names = ["teacher", *(["control"] if p.cfg.control else []), *p.protections]
    evidence = p.secret is not None and bool(p.challenges)
    return PlanSummary(
        fingerprint=p.fingerprint,
        cfg=p.cfg,
        dataset=DatasetInfo(
            name=dataset.name,
            fingerprint=dataset.fingerprint,
            n_train=len(dataset.x_train),
            n_test=len(dataset.x_test),
        ),
        labelled_samples=len(p.data.x_train),
        transfer_samples=None if p.transfer is None else len(p.transfer),
        served={name: served(name) for name in names},
        compares_raw="teacher_raw" in p.teachers,
        protections=p.protections,
        budget_teachers=p.budget_teachers,
        ls_names=[name for name, _, _ in p.ls_recipes],
        attack_names=[name for name, _, _ in p.attack_rows],
        tasks=[
            TaskRef(seed_index=t.seed_index, phase=t.phase, key=t.key, epochs=p.task_epochs(t.phase))
            for t in p.tasks
        ],  # fmt: skip
        commitment=p.secret.commitment() if evidence and p.secret is not None else None,
        keyed_costs=keyed_costs(p.teachers, dataset) if evidence else {},
    )
