"""What a report tells the owner: the verdict in plain words, why, what would make it conclusive, the
serving cost and budget, and the next steps. A pure function of the typed report (`report_findings`;
`findings` takes and gives JSON: old reports and extra sections are tolerated), computed once when the
report is assembled and read by its HTML page alike."""

from __future__ import annotations

import math
from typing import Any

from ml.audit.result import (
    AuditReport,
    ControlCheck,
    Findings,
    ServedSection,
    ServingWords,
    StudentResult,
    SuggestedAudit,
)
from ml.audit.stats import seeds_to_resolve
from ml.audit.verdict import outcome
from ml.evidence.heldout import evidence_words

# The setting that tells a copyable teacher from a protected one on our benchmark (docs/calibration.md:
# mnist1d, MLP student): function matching copies a plain CE teacher at 300 epochs over 5 seeds.
DISCRIMINATING_EPOCHS = 300
VERDICT_SEEDS = 5
# A schedule below this share of the discriminating one is indicative whatever the job says.
INDICATIVE_SHARE = 1 / 3
# the first next step for a model audited through its endpoint
DEPLOYED_STEP = (
    "cmim does not serve this model: its deployment does. Where the steps below name cmim's predict "
    "endpoints or per-key budgets, apply them to your deployment's own keys and limits."
)
DISCRIMINATING_ATTACK = "fm"

OUTCOME_LABELS = {
    "copied": "copied beyond LS (significant after Holm)",
    "within_noise": "ahead of LS within noise (not significant after Holm)",
    "not_copied": "not copied beyond LS",
}
HEADLINES = {
    "distillable": "Distillable: a thief can copy this model beyond what its own labelled data gives it.",
    "undistillable": "Undistillable as served: no knockoff beat a student trained on the thief's own "
    "labelled data, and the same audit did copy a plain CE control, so it would have caught a copyable "
    "model.",
    "inconclusive": "Inconclusive: this audit cannot say whether the model can be copied.",
}


def findings(report: dict[str, Any] | AuditReport, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """`report_findings` of a report as JSON (a stored report of any version), as JSON."""
    typed = report if isinstance(report, AuditReport) else AuditReport.model_validate(report)
    return report_findings(typed, spec).model_dump(mode="json")


def report_findings(report: AuditReport, spec: dict[str, Any] | None = None) -> Findings:
    """The report's verdict in plain words, why, what would make it conclusive, serving, next steps.

    `spec` is the job's specification when known (a `preset` or `audit.indicative` there marks the
    audit indicative); without it the job's marks the report keeps (`job`) and its config are read."""
    cfg = report.config
    verdict = report.verdict
    epochs, seeds = int(cfg.get("epochs") or 0), int(cfg.get("seeds") or 0)
    rows = _rows(report.students)
    control = report.control
    control_rows = _rows(control.students) if control else []
    alpha = float(cfg.get("alpha", 0.05))
    why: list[str] = []
    to_conclude: list[str] = []
    target_epochs, target_seeds = epochs, seeds
    copied = [r for r in rows if r["outcome"] == "copied"]
    ahead = sorted((r for r in rows if r["outcome"] == "within_noise"), key=lambda r: -r["margin"])
    best = max(rows, key=lambda r: r["margin"]) if rows else None

    if copied:
        c = min(copied, key=lambda r: r["p_holm"])
        why.append(
            f"{c['row']} knockoffs ({c['student']} students) reach {c['acc']:.2f} % against "
            f"{c['ls_acc']:.2f} % for the best label-smoothing student: {c['margin']:+.2f} ± "
            f"{c['margin_se']:.2f} points, "
            f"significant after Holm's adjustment over {len(rows)} attack rows (p = {c['p_holm']:.2g})."
        )
    if 0 < seeds < 2:
        why.append(f"Only {seeds} seed was run: a difference between students cannot be tested.")
        to_conclude.append(f"Run at least 2 seeds ({VERDICT_SEEDS} for a verdict: `audit.seeds`).")
        target_seeds = max(target_seeds, VERDICT_SEEDS)
    elif ahead and not copied:
        a = ahead[0]
        why.append(
            f"{a['row']} ({a['student']} students) is ahead of the best label-smoothing student by "
            f"{a['margin']:+.2f} ± {a['margin_se']:.2f} points, which is within the noise of {seeds} seeds "
            f"after Holm's adjustment over {len(rows)} attack rows (p = {a['p_holm']:.2g})."
        )
        need = seeds_to_resolve(a["margin"], a["std"], a["ls_std"], alpha / max(len(rows), 1))
        if need is None:
            to_conclude.append(
                f"Even 100 seeds would not resolve a gain of {a['margin']:.2f} points with this spread: "
                "read it as a thief gaining at most about that much, or audit at a longer schedule."
            )
        else:
            need = max(need, VERDICT_SEEDS, seeds + 1)
            target_seeds = max(target_seeds, need)
            to_conclude.append(
                f"Run about {need} seeds (this audit ran {seeds}): a gain of {a['margin']:.2f} points with "
                f"this spread needs that many to pass, or to be ruled out."
            )
    if verdict != "distillable" and seeds >= 2:
        lead = "No knockoff beat the label-smoothing student, but " if not ahead else "Also, "
        if control is None:
            why.append(
                f"{lead}no CE control was run, so nothing shows that this audit would have caught a "
                "copyable model."
            )
            to_conclude.append(
                "Name a zoo architecture for the CE control (`audit.control_arch`; an ONNX model has none of "
                "its own)."
            )
        elif control.verdict != "distillable":
            fms = [a for a in cfg.get("attacks") or [] if a.startswith(DISCRIMINATING_ATTACK)]
            why.append(
                f"{lead}the plain CE control was not copied either at {epochs} epochs, so this audit could "
                "not have caught a copyable model."
            )
            if epochs < DISCRIMINATING_EPOCHS:
                target_epochs = DISCRIMINATING_EPOCHS
                target_seeds = max(target_seeds, VERDICT_SEEDS)
                to_conclude.append(
                    f"The CE control was not copied at {epochs} epochs: the discriminating setting needs "
                    f"about {DISCRIMINATING_EPOCHS} epochs and {VERDICT_SEEDS} seeds (`audit.epochs`, "
                    "`audit.seeds`)."
                )
            if not fms:
                to_conclude.append(
                    f"Add the `{DISCRIMINATING_ATTACK}` attack (function matching on mixed inputs): the one "
                    "that copied a CE teacher on our benchmark."
                )
            if epochs >= DISCRIMINATING_EPOCHS and fms:
                to_conclude.append(
                    "The control resists even the discriminating schedule: the student may match the teacher "
                    "alone (try a weaker student, e.g. `mlp`), or the attacker holds so much labelled data "
                    "that copying adds nothing (try `audit.labelled_fraction` 0.25)."
                )
    if verdict == "undistillable" and best is not None:
        why.append(
            "Every knockoff's mean is at or below the best label-smoothing student's (closest: "
            f"{best['row']}, {best['margin']:+.2f} ± {best['margin_se']:.2f} points), and the CE control "
            "was copied."
        )
    why_indicative = indicative(report, spec if spec is not None else report.job)
    if why_indicative:
        if verdict != "distillable" and target_epochs < DISCRIMINATING_EPOCHS:
            to_conclude.append(
                f"Run the standard audit ({DISCRIMINATING_EPOCHS} epochs, {VERDICT_SEEDS} seeds; the "
                "`standard` preset, whose data, attacks and expected time `cmim presets` and "
                "GET /api/v1/presets list): "
                "this one is indicative."
            )
        target_epochs = max(target_epochs, DISCRIMINATING_EPOCHS)
        target_seeds = max(target_seeds, VERDICT_SEEDS)
    suggested = None
    if (target_epochs, target_seeds) != (epochs, seeds):
        minutes = estimated_minutes(report, target_epochs, target_seeds)
        suggested = SuggestedAudit(epochs=target_epochs, seeds=target_seeds, estimated_minutes=minutes)
        to_conclude.append(
            f"Estimated time of this audit (its data and attacks) at {target_epochs} epochs and "
            f"{target_seeds} seeds: "
            + (
                f"{_duration(minutes)} on this worker (scaled from this audit's own measured time; "
                "n workers share it)."
                if minutes is not None
                else "unknown (this report holds no measured time)."
            )
        )
    capped = capped_words(report)
    if capped is not None:
        why.append(capped)
        to_conclude.append(
            "Raise the deployed model's query cap (`teacher.endpoint.max_queries`) to what the unlimited "
            "phase asks, then audit again."
        )
    headline = HEADLINES.get(verdict, HEADLINES["inconclusive"])
    if verdict == "inconclusive" and why:
        headline = f"Inconclusive: {_lower_first(why[-1] if not ahead else why[0])}"
    if capped is not None and verdict != "distillable":
        at = report.verdict_budget
        headline += f" It holds for attackers of at most {at:,} queries: the query cap paid for no more."
    if why_indicative:
        headline += f" Indicative only: {why_indicative} It cannot show that a model is undistillable."
    control_copied = [r for r in control_rows if r["outcome"] == "copied"]
    out = Findings(
        verdict=verdict,
        headline=headline,
        why=why,
        indicative=why_indicative,
        to_conclude=to_conclude if verdict != "distillable" else [],
        suggested_audit=suggested if verdict != "distillable" else None,
        control_check=_control_check(control, control_copied),
        serving=serving(report),
        safe_budget=report.served_safe_budget(),
        next_steps=next_steps(
            report, verdict, copied, ahead or ([best] if best and best["margin"] > 0 else [])
        ),
    )
    words = evidence_words(report.evidence)  # whether evidence of theft can work for this model
    if words is not None:
        out.evidence = words
    if report.deployed is not None:  # audited through its endpoint: its deployment serves it
        assert out.serving is not None
        out.serving.text = report.deployed["text"]
        out.evidence = report.deployed["evidence"]
        out.next_steps.insert(0, DEPLOYED_STEP)
    return out


def indicative(report: AuditReport | dict[str, Any], spec: dict[str, Any] | None = None) -> str | None:
    """Why the audit is only indicative (a quick preset, an `indicative` flag, or a schedule far below
    the discriminating one), or None."""
    typed = report if isinstance(report, AuditReport) else AuditReport.model_validate(report)
    cfg, spec, top = typed.config, spec or {}, typed.model_extra or {}
    audit = spec.get("audit") or {}
    epochs = int(cfg.get("epochs") or 0)
    flagged = any(d.get("indicative") is True for d in (cfg, audit, top, spec)) or "quick" in (
        d.get("preset") for d in (cfg, audit, top, spec)
    )
    if flagged:
        return f"this is a quick audit ({epochs} epochs, {cfg.get('seeds', '?')} seeds), marked indicative."
    if epochs and epochs < DISCRIMINATING_EPOCHS * INDICATIVE_SHARE:
        return (
            f"its schedule ({epochs} epochs) is far below the one that discriminates on our benchmark "
            f"({DISCRIMINATING_EPOCHS})."
        )
    return None


def estimated_minutes(report: AuditReport, epochs: int, seeds: int) -> float | None:
    """Minutes the same audit would take at `epochs` and `seeds` on the worker that ran it: its measured
    task time scaled by epochs x seeds (the audit's work is linear in both)."""
    cfg = report.config
    measured = (report.timing and report.timing.task_seconds) or report.wall_s
    done = int(cfg.get("epochs") or 0) * int(cfg.get("seeds") or 0)
    if not measured or not done:
        return None
    return float(measured) * epochs * seeds / done / 60


def serving(report: AuditReport) -> ServingWords:
    """How the model is served and what that costs an honest user, in plain words."""
    served = report.teacher.serving
    cost = served.honest_cost
    served_as = (report.statement and report.statement.served_as) or str(
        served.output_mode if "output_mode" in served.model_fields_set else "?"
    )
    acc = report.teacher.accuracy
    if cost:
        text = (
            f"Honest users get {cost['accuracy']:.2f} % right answers"
            + (f" (the model itself: {acc:.2f} %)" if isinstance(acc, int | float) else "")
            + f", calibration error {cost.get('ece', float('nan')):.2f} %, "
            f"{cost.get('refused', 0):.2f} % of clean queries refused and {cost.get('altered', 0):.2f} % "
            "altered by the serving policy."
        )
    else:
        text = "The honest-user cost was not measured (an older report)."
    return ServingWords(served_as=served_as, teacher_accuracy=acc, honest_cost=cost, text=text)


def capped_words(report: AuditReport) -> str | None:
    """What a verdict at a budget means (a deployed model whose query cap did not pay for the unlimited
    phase, `verdict_budget` in the report); None for a verdict on the unlimited attacker."""
    at = report.verdict_budget
    if at is None:
        return None
    unmeasured = (
        "The unlimited attacker (querying throughout training) was not measured: the query cap paid only "
        f"for the budget phases up to {at:,} queries"
    )
    if report.verdict == "distillable":
        return f"{unmeasured}; a knockoff is copied already there, and more answers only help a thief."
    return (
        f"{unmeasured}, so this verdict holds only for attackers holding at most {at:,} answers, and the "
        f"safe budget is at most {at:,}."
    )


def next_steps(
    report: AuditReport, verdict: str, copied: list[dict[str, Any]], ahead: list[dict[str, Any]]
) -> list[str]:
    """What to do now, in order."""
    served_as = serving(report).served_as
    mode = report.threat_model.output_mode.get("kind")
    safe = report.served_safe_budget()
    steps = []
    if verdict == "distillable":
        c = min(copied, key=lambda r: r["p_holm"]) if copied else None
        steps.append(
            f"Do not rely on this protection as served ({served_as})"
            + (f": {c['row']} copies it." if c else ".")
        )
        if mode != "label":
            steps.append(
                'Serve labels only (`audit.output_mode: {"kind": "label"}`), the best protection our '
                "benchmark found, and audit again."
            )
        else:
            steps.append(
                "It is already served labels only: a smaller per-key query budget (the budget curve) "
                "and fewer keys per owner are what remains; audit again with `audit.query_budgets`."
            )
        return steps
    if verdict == "undistillable":
        steps.append(
            f"Serve it as audited: {served_as}. The predict endpoints answer exactly this way; another "
            "output mode or policy needs a new audit."
        )
    else:
        steps.append("Do not read this audit as a pass: make it conclusive first (above).")
    if safe is None:
        steps.append(
            "This audit tested no query budgets: run it with `audit.query_budgets` to learn a safe "
            "per-key budget."
        )
    elif safe > 0:
        steps.append(
            f"Set the per-key query budget to the safe budget, {safe:,} queries: it is the served model's "
            "default per-key budget (`CMIM_MODEL_QUERY_BUDGET` overrides it)."
        )
    else:
        steps.append(
            "No tested query budget was safe (a knockoff beat label smoothing at the smallest one): "
            "serve with a smaller budget only after auditing it."
        )
    if safe and not _budget_discriminates(report):
        steps[-1] += (
            " The CE control was not copied at any tested budget either, so this curve does not show that "
            "the budget is what protects the model."
        )
    per_key = f"{safe:,}" if safe else "the per-key budget"
    limits = [
        f"many keys (n keys hold n x {per_key} queries: the monitor's alerts suspend the keys they name, "
        "docs/enforcement.md; set an owner budget in the model's enforcement policy or "
        "`CMIM_GLOBAL_QUERY_BUDGET`, and control who gets keys)",
        "label-only copying that comes within noise of the label-smoothing student (on our benchmark, with "
        "twelve times the safe budget: +0.95 ± 0.70 points)",
        "attacks outside the audited suite, and a thief holding more labelled data than the audit assumed",
    ]
    if ahead:
        a = ahead[0]
        limits.insert(
            1, f"{a['row']}, ahead here by {a['margin']:+.2f} ± {a['margin_se']:.2f} points (within noise)"
        )
    steps.append("What the protection does not stop: " + "; ".join(limits) + ".")
    return steps


def _rows(students: dict[str, StudentResult]) -> list[dict[str, Any]]:
    """Every attack row of a black box with what the findings read, the outcome derived if missing."""
    out = []
    nan = float("nan")
    for arch, s in students.items():
        best = s.ls.get(s.best_ls or "")
        for name, r in s.attacks.items():
            if r.margin is None:
                continue
            p_holm = r.p_holm if r.p_holm is not None else r.p_value
            out.append(
                {
                    "student": arch,
                    "row": name,
                    "outcome": r.outcome or outcome(r.model_dump()),
                    "margin": r.margin,
                    "margin_se": nan if r.margin_se is None else r.margin_se,
                    "p_holm": nan if p_holm is None else p_holm,
                    "acc": r.acc_best.mean,
                    "std": r.acc_best.std,
                    "ls_acc": s.ls_acc if s.ls_acc is not None else (best.acc_best.mean if best else nan),
                    "ls_std": best.acc_best.std if best else nan,
                }
            )
    return out


def _control_check(control: ServedSection | None, copied: list[dict[str, Any]]) -> ControlCheck:
    if control is None:
        return ControlCheck(
            status="not_run", text="No CE control was run: the audit's power to discriminate is unchecked."
        )
    if control.verdict == "distillable":
        rows = ", ".join(sorted({r["row"] for r in copied}))
        return ControlCheck(
            status="passed",
            text=f"The audit copied a plain CE teacher of the same architecture ({rows}): it can tell a "
            "copyable model from a protected one.",
        )
    return ControlCheck(
        status="failed",
        text="The audit did not copy a plain CE teacher of the same architecture: it could not have "
        "caught a copyable model.",
    )


def _budget_discriminates(report: AuditReport) -> bool:
    """Whether the budget curve copied the CE control at some tested budget (True when it has no control)."""
    control = (report.safe_budget or {}).get("control")
    tested = [int(b) for b in ((report.budgets or {}).get("control") or {})]
    return not control or not tested or min(control.values()) < max(tested)


def _duration(minutes: float) -> str:
    if minutes < 1:
        return "under a minute"
    if minutes < 120:
        return f"about {math.ceil(minutes)} minutes"
    return f"about {minutes / 60:.1f} hours"


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:2] != s[:2].upper() else s
