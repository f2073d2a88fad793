"""The audit result: a typed, versioned report. Its JSON serialisation is the report every reader gets.

`AuditReport.model_dump(mode="json")` is the stored `report.json`: a field is written when it was set,
so a report keeps exactly the keys it was assembled with (no section of a black box that was not
audited appears as null). `AuditReport.model_validate(json)` reads any stored report, those written by
earlier versions included: every field has a default and unknown keys are kept. The JSON Schema of
the serialisation is `docs/report-schema.json` (`report_schema()`; a test keeps the two equal).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from ml.audit.config import REPORT_VERSION

Outcome = Literal["copied", "within_noise", "not_copied"]
Verdict = Literal["distillable", "undistillable", "inconclusive"]


class Part(BaseModel):
    """A part of the report: tolerant of other versions' keys, serialised with the keys it was given."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants", validate_assignment=False)

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        kept = self.model_fields_set | set(self.__pydantic_extra__ or {})
        return {k: v for k, v in handler(self).items() if k in kept}


class Stats(Part):
    """A figure over seeds (`ml.audit.stats.summarise`)."""

    mean: float = float("nan")
    std: float = float("nan")
    se: float = float("nan")
    values: list[float] = Field(default_factory=list)


class Row(Part):
    """One student row (an LS row or an attack row) over the seeds; attack rows carry their test."""

    acc_best: Stats = Field(default_factory=Stats)
    acc_last: Stats = Field(default_factory=Stats)
    fidelity: Stats | None = None  # absent for LS rows (they query no teacher)
    queries: int = 0
    margin: float | None = None  # attack rows: against the best LS row of the same student
    margin_se: float | None = None
    p_value: float | None = None
    significant: bool | None = None
    p_holm: float | None = None
    significant_holm: bool | None = None
    outcome: Outcome | None = None


class StudentResult(Part):
    """One student architecture against one black box: its rows and its verdict."""

    ls: dict[str, Row] = Field(default_factory=dict)
    attacks: dict[str, Row] = Field(default_factory=dict)
    best_ls: str | None = None
    ls_acc: float | None = None
    best_attack: str | None = None
    margin: float | None = None
    margin_se: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    copied_by: list[str] = Field(default_factory=list)
    margin_last: float | None = None
    verdict: Verdict = "inconclusive"
    reason: str = ""


class Section(Part):
    """What the audit found against one black box: per student, and the black box's verdict."""

    students: dict[str, StudentResult] = Field(default_factory=dict)
    verdict: Verdict = "inconclusive"


class ServingSummary(Part):
    """How a black box is served and what that costs honest users."""

    output_mode: dict[str, Any] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(default_factory=dict)
    honest_cost: dict[str, float] | None = None


class ServedSummary(Part):
    """A served model's accuracy, its I_T curves and how it is served (means over per-seed models)."""

    accuracy: float | None = None
    cmi_test: dict[str, float] = Field(default_factory=dict)
    cmi_train: dict[str, float] = Field(default_factory=dict)
    accuracy_stats: Stats | None = None
    serving: ServingSummary = Field(default_factory=ServingSummary)


class TeacherSection(ServedSummary):
    """The audited teacher; a job adds its checkpoint's metadata and the uploaded model it came from."""

    meta: dict[str, Any] | None = None
    uploaded_model_id: str | None = None


class ServedSection(ServedSummary, Section):
    """Another audited black box (the CE control, a protection): its summary and its section."""

    arch: str | None = None  # the control's architecture


class ThreatModel(Part):
    output_mode: dict[str, Any] = Field(default_factory=dict)
    labelled_fraction: float = 1.0
    labelled_samples: int = 0
    query_augmentation: str = ""
    epochs: int = 0
    queries_per_view_per_epoch: int = 0
    query_budgets: list[int] | None = None
    transfer: dict[str, Any] | None = None


class DatasetInfo(Part):
    name: str = ""
    fingerprint: str = ""
    n_train: int = 0
    n_test: int = 0


class Statement(Part):
    """What the protection as served stops and what it does not, in plain words."""

    served_as: str = ""
    stops: list[str] = Field(default_factory=list)
    does_not_stop: list[str] = Field(default_factory=list)
    enforcement: str | None = None
    text: str = ""


class Timing(Part):
    task_seconds: float | None = None
    epoch_units: int = 0
    seconds_per_epoch_unit: float | None = None
    wall_s: float | None = None


class SuggestedAudit(Part):
    epochs: int
    seeds: int
    estimated_minutes: float | None = None


class ControlCheck(Part):
    status: Literal["not_run", "passed", "failed"]
    text: str


class ServingWords(Part):
    served_as: str = ""
    teacher_accuracy: float | None = None
    honest_cost: dict[str, float] | None = None
    text: str = ""


class Findings(Part):
    """What the report tells its owner: the verdict in plain words, why, what would make it conclusive."""

    verdict: Verdict = "inconclusive"
    headline: str = ""
    why: list[str] = Field(default_factory=list)
    indicative: str | None = None
    to_conclude: list[str] = Field(default_factory=list)
    suggested_audit: SuggestedAudit | None = None
    control_check: ControlCheck | None = None
    serving: ServingWords | None = None
    safe_budget: int | None = None
    next_steps: list[str] = Field(default_factory=list)
    evidence: str | None = None  # whether evidence of theft can work for this model, and why (or why not)


class JobHeadline(BaseModel):
    """What the job list shows of a report: verdict, teacher accuracy, the per-key safe budget."""

    verdict: str | None
    teacher_accuracy: float | None
    safe_budget: int | None


class AuditReport(Section):
    """The audit's report: the teacher's section (its students and verdict) and every other section."""

    version: int = REPORT_VERSION
    config: dict[str, Any] = Field(default_factory=dict)  # the AuditConfig as run, query budgets resolved
    threat_model: ThreatModel = Field(default_factory=ThreatModel)
    dataset: DatasetInfo = Field(default_factory=DatasetInfo)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    raw_probabilities: Section | None = None  # the teacher served with full probabilities, compared
    control: ServedSection | None = None  # None: no CE control was run
    protections: dict[str, ServedSection] | None = None
    budgets: dict[str, dict[str, Section]] | None = None  # black box -> budget (as text) -> section
    safe_budget: dict[str, dict[str, int]] | None = None  # black box -> student -> queries per key
    verdict_reason: str = ""
    # a model deployed elsewhere whose query cap paid for no unlimited phase: the verdict is that of the
    # largest budget run, this many queries (None: the verdict is on the unlimited attacker)
    verdict_budget: int | None = None
    statement: Statement | None = None
    evidence: dict[str, Any] | None = None  # ml.evidence.audit.evidence_section
    wall_s: float | None = None
    timing: Timing | None = None
    findings: Findings | None = None
    # what a job adds
    job_id: str | None = None
    job: dict[str, Any] | None = None  # the job's marks (preset, indicative)
    monitor: dict[str, Any] | None = None
    fine_tune: dict[str, Any] | None = None
    deployed: dict[str, Any] | None = None  # a model audited through its endpoint: what its cap allowed

    def to_json(self) -> dict[str, Any]:
        """The stored report: this serialisation, NaN kept as NaN (json.dumps writes it)."""
        return self.model_dump(mode="json")

    def served_safe_budget(self) -> int | None:
        """The served teacher's per-key safe budget: the smallest over the audited students (None: the
        audit tested no budgets)."""
        safe = (self.safe_budget or {}).get("teacher")
        return min(safe.values()) if safe else None

    def job_headline(self) -> JobHeadline:
        accuracy, safe = self.teacher.accuracy, self.served_safe_budget()
        return JobHeadline(verdict=self.verdict, teacher_accuracy=accuracy, safe_budget=safe)


def report_schema() -> dict[str, Any]:
    """The JSON Schema of a report (docs/report-schema.json)."""
    schema = AuditReport.model_json_schema()
    schema["$id"] = "https://cmim.dev/schemas/report.json"
    schema["title"] = f"cmim audit report, version {REPORT_VERSION}"
    return schema
