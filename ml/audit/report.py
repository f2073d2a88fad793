"""Assembling the report from the tasks' results: sections per black box, verdicts, budgets, statement.

The assembled result carries everything a service publishes: the report, the serving policy fitted
to the (single) audited teacher exactly as the audit served it, and the summaries inside the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ml.audit.advice import findings
from ml.audit.blackbox import serving_summary, teacher_summary
from ml.audit.config import REPORT_VERSION
from ml.audit.statement import protection_statement
from ml.audit.stats import row_stats
from ml.audit.tasks import AuditPlan, TaskResult
from ml.audit.verdict import audit_verdict, combine_verdicts, judge_black_box, safe_budget
from ml.evidence.audit import evidence_section, keyed_costs
from ml.policy import FittedPolicy

RowKey = tuple[int | None, str | None, str, str]  # (phase, black box, student arch, row name)


@dataclass
class AuditResult:
    """The audit's outcome: the JSON report and the fitted serving policy of the audited teacher."""

    report: dict[str, Any]
    policy: FittedPolicy | None  # None when the teacher is served without a policy

    @property
    def teacher_summary(self) -> dict[str, Any]:
        return self.report["teacher"]

    @property
    def serving_summary(self) -> dict[str, Any]:
        return self.report["teacher"]["serving"]

    @property
    def safe_budget(self) -> dict[str, dict[str, int]]:
        return self.report.get("safe_budget", {})


def assemble(plan: AuditPlan, results: Iterable[TaskResult], *, wall_s: float | None = None) -> AuditResult:
    """The report of a plan from its tasks' results (any order; one result per task)."""
    by_task = {(r["seed_index"], r["phase"]): r for r in results}
    missing = [t.describe() for t in plan.tasks if (t.seed_index, t.phase) not in by_task]
    if missing:
        what = ", ".join(missing)
        raise ValueError(f"{len(missing)} of {len(plan.tasks)} audit tasks have no result: {what}")
    cfg, dataset, teachers = plan.cfg, plan.dataset, plan.teachers
    values: dict[RowKey, dict[str, list[float]]] = {}
    queries: dict[RowKey, int] = {}
    for task in plan.tasks:  # in task (seed) order: the values of a row are per seed, in seed order
        records = by_task[(task.seed_index, task.phase)]["records"]
        for phase, teacher, arch, name, best, last, fidelity, n_queries in records:
            key = (phase, teacher, arch, name)
            rec = values.setdefault(key, {"best": [], "last": [], "fidelity": []})
            rec["best"].append(best)
            rec["last"].append(last)
            rec["fidelity"].append(fidelity)
            queries[key] = n_queries

    def rows_for(phase: int | None, teacher_key: str | None, arch: str, names: list[str]) -> dict[str, Any]:
        return {
            n: row_stats(*(values[(phase, teacher_key, arch, n)][k] for k in ("best", "last", "fidelity")),
                         queries[(phase, teacher_key, arch, n)])
            for n in names
        }  # fmt: skip

    ls_names, attack_names = [r[0] for r in plan.ls_rows], [r[0] for r in plan.attack_rows]

    def section(phase: int | None, t: str) -> dict[str, Any]:
        rows = {}
        for arch in cfg.students:
            ls = rows_for(None, None, arch, ls_names)
            attacks = rows_for(phase, t, arch, attack_names)
            if cfg.transfer:  # the baseline: the better of LS and hard-label copying on the same queries
                ls = ls | {"hard_label_transfer": attacks.pop("hard_label")}
            rows[arch] = (ls, attacks)
        judged = judge_black_box(rows, cfg.alpha)  # Holm over every attack row of this black box
        per_student = {
            arch: {"ls": ls, "attacks": attacks, **judged[arch]} for arch, (ls, attacks) in rows.items()
        }
        return {
            "students": per_student,
            "verdict": combine_verdicts([v["verdict"] for v in per_student.values()]),
        }

    summaries: dict[tuple[int, ...], dict[str, Any]] = {}  # black boxes serving the same models share it

    def served(name: str) -> dict[str, Any]:
        box = teachers[name]
        key = tuple(id(m) for m in box.models)
        if key not in summaries:
            summaries[key] = teacher_summary(box.models, dataset)
        return {**summaries[key], "serving": serving_summary(box, dataset)}

    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "config": cfg.model_dump(mode="json"),
        "threat_model": {
            "output_mode": cfg.output_mode.model_dump(),
            "labelled_fraction": cfg.labelled_fraction,
            "labelled_samples": len(plan.data.x_train),
            "query_augmentation": "the student's own view; mixup for fm; mixing ratios in edge_range for "
            "fm_edge; Gaussian noise of noise_scale stds for fm_noise; a second strong view for mlkd",
            "epochs": cfg.epochs,
            "queries_per_view_per_epoch": len(plan.data.x_train),
            "query_budgets": cfg.query_budgets,
            "transfer": None
            if plan.transfer is None
            else {"dataset": cfg.transfer, "params": cfg.transfer_params, "samples": len(plan.transfer)},
        },
        "dataset": {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint,
            "n_train": len(dataset.x_train),
            "n_test": len(dataset.x_test),
        },
        "teacher": served("teacher"),
        **section(None, "teacher"),
    }
    if "teacher_raw" in teachers:
        report["raw_probabilities"] = section(None, "teacher_raw")
    if cfg.control:
        report["control"] = {"arch": cfg.control_arch, **served("control"), **section(None, "control")}
    if plan.protections:
        report["protections"] = {name: {**served(name), **section(None, name)} for name in plan.protections}
    if cfg.query_budgets:
        bt = plan.budget_teachers
        report["budgets"] = {t: {str(b): section(b, t) for b in cfg.query_budgets} for t in bt}
        report["safe_budget"] = {t: safe_budget(report["budgets"][t], cfg.students) for t in bt}
    if not cfg.control:
        report["control"] = None
    reason = "; ".join(f"{a}: {v['reason']}" for a, v in report["students"].items())
    report["verdict"], note = audit_verdict(
        report["verdict"], report["control"] and report["control"]["verdict"]
    )
    report["verdict_reason"] = reason + note
    report["statement"] = protection_statement(report)
    # --- evidence of theft (ml.evidence): detection over knockoffs, false positives over LS students ---
    if plan.secret is not None and plan.challenges:
        evidence = [e for t in plan.tasks for e in by_task[(t.seed_index, t.phase)].get("evidence", [])]
        best = {k: v["best"] for k, v in values.items()}
        costs = keyed_costs(teachers, dataset)
        report["evidence"] = evidence_section(evidence, best, costs, plan.secret)
    # --- end of evidence ---
    report["wall_s"] = wall_s
    report["timing"] = timing(plan, [by_task[(t.seed_index, t.phase)] for t in plan.tasks], wall_s)
    report["findings"] = findings(report)
    policies = teachers["teacher"].policies
    return AuditResult(report, policies[0] if policies and len(policies) == 1 else None)


def timing(plan: AuditPlan, results: list[TaskResult], wall_s: float | None) -> dict[str, Any]:
    """What the audit's tasks (results in plan order) took: their summed seconds (one worker running them
    one after another), the work in epochs of the unlimited schedule, and the seconds per such epoch."""
    seconds = [r.get("seconds") for r in results]
    task_s = None if any(s is None for s in seconds) else float(sum(seconds))  # type: ignore[arg-type]
    units = plan.total_epochs
    return {
        "task_seconds": task_s,
        "epoch_units": units,
        "seconds_per_epoch_unit": None if task_s is None else task_s / units,
        "wall_s": wall_s,
    }
