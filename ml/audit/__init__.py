"""The undistillability audit: LS students against knockoff students, trained in lockstep.

Per seed, every student (each LS row and each attack row, against the teacher and the CE control)
sees the same shuffled, augmented batches; each input view (plain, mixup, strong) is built once per
batch and each teacher is queried once per view, so the teacher's cost is shared by all students
of that seed. All students of a seed and architecture start from the same initialisation (common
random numbers: differences between rows are then the method's, not the init's). Different seeds
keep their own data order and initialisation, so statistics over seeds stay honest.

An audit is a plan of independent, deterministic tasks (`plan`, one per seed and budget phase),
each run by `run` and turned into the report by `assemble`; `executors` runs a plan in this process
or a local process pool, and the service fans the same tasks out over Celery workers.

Modules, one concept each: config, batches (input views), students (one run and its loss), groups
(stacked or module students), sources (live or cached queries), lockstep (one seed's training),
stats, verdict, blackbox (served teachers and their summaries), statement, findings (what a report tells
its owner), records (what a task hands over), summary (what the report needs of the models, measured
once), tasks (plan and run), result (the typed, versioned report), report (assemble), executors.
"""

from ml.audit.batches import VIEWS, Batch
from ml.audit.blackbox import (
    AnsweringModel,
    BlackBox,
    DeployedPhases,
    deployed_phases,
    serve_box,
    serving_summary,
    teacher_summary,
)
from ml.audit.config import (
    CMI_CURVE_TEMPERATURES,
    DEFAULT_BUDGET_PASSES,
    REPORT_VERSION,
    AuditConfig,
    AuditProgress,
)
from ml.audit.executors import run_audit, run_in_pool, run_in_process
from ml.audit.findings import OUTCOME_LABELS, findings, report_findings
from ml.audit.groups import ModuleGroup, StackedGroup
from ml.audit.lockstep import LOCKSTEP_MIXES, lockstep_ratio, train_lockstep
from ml.audit.records import EvidenceRecord, StudentRecord, TaskResult
from ml.audit.report import assemble
from ml.audit.result import AuditReport, Findings, report_schema
from ml.audit.sources import CachedSource, LiveSource
from ml.audit.statement import protection_statement
from ml.audit.stats import holm, summarise, welch_one_sided
from ml.audit.students import Run
from ml.audit.summary import PlanSummary
from ml.audit.tasks import AuditPlan, AuditTask, DirectoryResults, ResultStore, plan, run, summarise_plan
from ml.audit.verdict import audit_verdict, combine_verdicts, judge, judge_black_box, outcome, safe_budget
from ml.train import TrainingCancelled

__all__ = [
    "CMI_CURVE_TEMPERATURES", "DEFAULT_BUDGET_PASSES", "LOCKSTEP_MIXES", "OUTCOME_LABELS", "REPORT_VERSION",
    "VIEWS", "AnsweringModel", "AuditConfig", "AuditPlan", "AuditProgress", "AuditReport", "AuditTask",
    "Batch", "BlackBox", "CachedSource", "DeployedPhases", "DirectoryResults", "EvidenceRecord", "Findings",
    "LiveSource", "ModuleGroup", "PlanSummary", "ResultStore", "Run", "StackedGroup", "StudentRecord",
    "TaskResult", "TrainingCancelled", "assemble", "audit_verdict", "combine_verdicts", "deployed_phases",
    "findings", "holm", "judge", "judge_black_box", "lockstep_ratio", "outcome", "plan",
    "protection_statement", "report_findings", "report_schema", "run", "run_audit", "run_in_pool",
    "run_in_process", "safe_budget", "serve_box", "serving_summary", "summarise", "summarise_plan",
    "teacher_summary", "train_lockstep", "welch_one_sided",
]  # fmt: skip
