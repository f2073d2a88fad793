"""What the report needs of a plan's models, computed once where the models are: the plan summary.

`ml.audit.tasks.summarise_plan(plan)` (`plan.summary`) measures every served black box (accuracy, I_T
curves, honest-user cost; the keyed answers' cost) and keeps the plan's shape (rows, tasks, budgets,
the evidence commitment).
`ml.audit.report.assemble(summary, results)` needs nothing else: no model, no data, no forward pass,
so whoever holds the summary (the chord callback of a fanned-out job) assembles the report.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ml.audit.config import AuditConfig
from ml.audit.result import DatasetInfo, ServedSummary


class TaskRef(BaseModel):
    """A task of the plan as the assembly knows it: its key, its place and its work in epochs."""

    seed_index: int
    phase: int | None
    key: str
    epochs: int
    nulls: bool = False  # the null's independent models of other architectures

    @property
    def place(self) -> tuple[int, int | None, bool]:
        return self.seed_index, self.phase, self.nulls

    def describe(self, seeds: int) -> str:
        return describe_task(self.seed_index, seeds, self.phase, self.nulls)


def describe_task(seed_index: int, seeds: int, phase: int | None, nulls: bool) -> str:
    """A task in words: "seed 2/5", "seed 2/5, budget 4000", "seed 2/5, null models"."""
    what = ", null models" if nulls else "" if phase is None else f", budget {phase}"
    return f"seed {seed_index + 1}/{seeds}{what}"


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
