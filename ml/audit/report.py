"""Assembling the report from the plan's summary and the tasks' results: a pure function.

`assemble(summary, results)` reads no model and runs no forward pass: what depends on the models was
measured once into the plan's summary (`ml.audit.summary`). It builds every section (per black box,
verdicts, budgets), the statement, the evidence section, the timing, the findings and the headline,
and returns the typed report (`ml.audit.result.AuditReport`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ml.audit.config import REPORT_VERSION
from ml.audit.findings import report_findings
from ml.audit.records import TaskResult
from ml.audit.result import AuditReport
from ml.audit.statement import deployed_served_as, protection_statement
from ml.audit.stats import row_stats
from ml.audit.summary import PlanSummary
from ml.audit.verdict import audit_verdict, combine_verdicts, judge_black_box, safe_budget
from ml.evidence.audit import evidence_section

RowKey = tuple[int | None, str | None, str, str]  # (phase, black box, student arch, row name)
QUERY_AUGMENTATION = (
    "the student's own view; mixup for fm; mixing ratios in edge_range for fm_edge; Gaussian noise of "
    "noise_scale stds for fm_noise; a second strong view for mlkd"
)


def assemble(
    summary: PlanSummary,
    results: Iterable[TaskResult],
    *,
    wall_s: float | None = None,
    job: dict[str, Any] | None = None,
    deployed: dict[str, Any] | None = None,
) -> AuditReport:
    """The report of a plan from its summary and its tasks' results (any order; one result per task).

    `job` is the job's marks (`preset`, `indicative`) when a job asked for the audit: the report keeps
    them, and a quick preset marks the findings indicative. `deployed` is the `deployed` section of a
    model audited through its endpoint (`worker.models`): the statement and findings say it is served
    as deployed."""
    by_task = {(r.seed_index, r.phase, r.nulls): r for r in results}
    cfg = summary.cfg
    missing = [t.describe(cfg.seeds) for t in summary.tasks if t.place not in by_task]
    if missing:
        what = ", ".join(missing)
        raise ValueError(f"{len(missing)} of {len(summary.tasks)} audit tasks have no result: {what}")
    ordered = [by_task[t.place] for t in summary.tasks]
    values: dict[RowKey, dict[str, list[float]]] = {}
    queries: dict[RowKey, int] = {}
    for result in ordered:  # in task (seed) order: the values of a row are per seed, in seed order
        for r in result.records:
            rec = values.setdefault(r.key, {"best": [], "last": [], "fidelity": []})
            rec["best"].append(r.best)
            rec["last"].append(r.last)
            rec["fidelity"].append(r.fidelity)
            queries[r.key] = r.queries

    def rows_for(phase: int | None, teacher_key: str | None, arch: str, names: list[str]) -> dict[str, Any]:
        return {
            n: row_stats(*(values[(phase, teacher_key, arch, n)][k] for k in ("best", "last", "fidelity")),
                         queries[(phase, teacher_key, arch, n)])
            for n in names
        }  # fmt: skip

    def section(phase: int | None, t: str) -> dict[str, Any]:
        rows = {}
        for arch in cfg.students:
            ls = rows_for(None, None, arch, summary.ls_names)
            attacks = rows_for(phase, t, arch, summary.attack_names)
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

    def served(name: str) -> dict[str, Any]:
        return summary.served[name].model_dump(mode="json")

    # A deployed model whose query cap did not pay for the unlimited phase: its verdict rests on the largest
    # budget run (`ml.audit.blackbox.deployed_phases`); `verdict_budget` says so. None: the unlimited phase.
    at = None if any(k[:2] == (None, "teacher") for k in values) else max(cfg.query_budgets or [0])
    if at == 0:
        raise ValueError("the teacher was attacked in no phase: neither the unlimited phase nor a budget")
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "config": cfg.model_dump(mode="json"),
        "threat_model": {
            "output_mode": cfg.output_mode.model_dump(),
            "labelled_fraction": cfg.labelled_fraction,
            "labelled_samples": summary.labelled_samples,
            "query_augmentation": QUERY_AUGMENTATION,
            "epochs": cfg.epochs,
            "queries_per_view_per_epoch": summary.labelled_samples,
            "query_budgets": cfg.query_budgets,
            "transfer": None
            if summary.transfer_samples is None
            else {
                "dataset": cfg.transfer,
                "params": cfg.transfer_params,
                "samples": summary.transfer_samples,
            },
        },
        "dataset": summary.dataset.model_dump(mode="json"),
        "teacher": served("teacher"),
        **section(at, "teacher"),
    }
    if at is not None:
        report["verdict_budget"] = at
    if summary.compares_raw:
        report["raw_probabilities"] = section(None, "teacher_raw")
    if cfg.control:
        report["control"] = {"arch": cfg.control_arch, **served("control"), **section(None, "control")}
    if summary.protections:
        names = summary.protections
        report["protections"] = {name: {**served(name), **section(None, name)} for name in names}
    if cfg.query_budgets:
        bt = summary.budget_teachers
        report["budgets"] = {t: {str(b): section(b, t) for b in cfg.query_budgets} for t in bt}
        report["safe_budget"] = {t: safe_budget(report["budgets"][t], cfg.students) for t in bt}
    if not cfg.control:
        report["control"] = None
    reason = "; ".join(f"{a}: {v['reason']}" for a, v in report["students"].items())
    control = report["control"] and report["control"]["verdict"]
    if at is not None and report["control"]:  # the control's power at the same budget
        control = report["budgets"].get("control", {}).get(str(at), report["control"])["verdict"]
    report["verdict"], note = audit_verdict(report["verdict"], control)
    if at is not None:
        note += (
            f"; the unlimited attacker was not measured (the query cap did not pay for it): the verdict "
            f"is at a budget of {at:,} queries, the largest run"
        )
    report["verdict_reason"] = reason + note
    # --- evidence of theft (ml.evidence): detection over knockoffs, false positives over LS students ---
    if summary.commitment is not None:
        evidence = [e.as_tuple() for r in ordered for e in r.evidence]
        best = {k: v["best"] for k, v in values.items()}
        report["evidence"] = evidence_section(evidence, best, summary.keyed_costs, summary.commitment)
    # --- end of evidence ---
    report["wall_s"] = wall_s
    report["timing"] = timing(summary, ordered, wall_s)
    if job is not None:
        report["job"] = job
    if deployed is not None:
        report["deployed"] = deployed
        report["teacher"]["serving"]["served_as"] = deployed_served_as(deployed)
    out = AuditReport.model_validate(report)
    out.statement = protection_statement(out)
    out.findings = report_findings(out)
    return out


def timing(summary: PlanSummary, results: list[TaskResult], wall_s: float | None) -> dict[str, Any]:
    """What the audit's tasks (results in plan order) took: their summed seconds (one worker running them
    one after another), the work in epochs of the unlimited schedule, and the seconds per such epoch."""
    seconds = [r.seconds for r in results]
    task_s = None if any(s is None for s in seconds) else float(sum(seconds))  # type: ignore[arg-type]
    units = summary.total_epochs
    return {
        "task_seconds": task_s,
        "epoch_units": units,
        "seconds_per_epoch_unit": None if task_s is None else task_s / units,
        "wall_s": wall_s,
    }
