"""The audit report page, which the API (`/api/v1/jobs/{id}/report.html`) and the dashboard both serve: one
self-contained HTML file (its stylesheet inline, its charts inline SVG) rendered from the dashboard's template
`report.html` with a job's stored report and the epochs of its training.

The template escapes every value it prints; only the charts are inserted as they are (`ml.charts` escapes
their text). The findings are the report's own when it carries them (the worker stores them with the job's
specification); an older report without them has them computed here, once per page."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from markupsafe import Markup
from pydantic import BaseModel

from app.services.schemas import JobOut
from app.services.templates import templates
from ml.audit import OUTCOME_LABELS, findings, outcome
from ml.charts import Bar, Rule, Series, bar_chart, line_chart
from ml.evidence import EVIDENCE_LIMITS

# The page's one stylesheet, inline so that the page can be saved as one file: the content security policy
# allows exactly this text (app.main hashes it).
CSS = (Path(__file__).parents[1] / "web" / "templates" / "report.css").read_text(encoding="utf-8")


def box_name(box: str) -> str:
    """A black box as the page names it: the CE control, or the protection's own name."""
    return "CE control" if box == "control" else box


def summary(s: Mapping[str, Any]) -> str:
    """A student section in words, without a verdict of its own: the report states one verdict, at the top."""
    rows = s.get("attacks") or {}
    copied = s.get("copied_by") or [n for n, r in rows.items() if r.get("outcome") == "copied"]
    if copied:
        return "copied beyond the best LS student by " + ", ".join(copied)
    ahead = [n for n, r in rows.items() if r.get("margin", 0) > 0]
    if ahead:
        return "ahead of the best LS student within noise: " + ", ".join(ahead)
    return "no knockoff ahead of the best LS student"


def against_ls(row: Mapping[str, Any]) -> tuple[str, str] | None:
    """A row against the best LS student (copied, within noise or not copied, after Holm): its class and
    words; None for a row with no margin (an LS student)."""
    if "margin" not in row:
        return None
    kind = row.get("outcome") or outcome(dict(row))
    return kind, OUTCOME_LABELS[kind]


def student_chart(arch: str, s: Mapping[str, Any], who: str) -> Markup:
    """The knockoffs' accuracy against the best LS student's, with standard-error bars."""
    ls, attacks, best_ls = s.get("ls") or {}, s.get("attacks") or {}, s.get("best_ls")
    best = ls.get(best_ls)
    bars = (
        [Bar(f"LS {best_ls}", best["acc_best"]["mean"], best["acc_best"].get("se", 0.0), True)]
        if best
        else []
    )
    bars += [Bar(n, r["acc_best"]["mean"], r["acc_best"].get("se", 0.0)) for n, r in attacks.items()]
    return Markup(
        bar_chart(
            bars,
            f"{who}: knockoff {arch} students vs the best LS student",
            "test accuracy (%), mean ± s.e. over seeds",
            reference=best["acc_best"]["mean"] if best else None,
        )
    )


def _unlimited(report: Mapping[str, Any], box: str, arch: str) -> tuple[int, Mapping[str, Any]] | None:
    """The unlimited attackers of a black box's student as one more point of its budget curve: at the
    queries its best knockoff sent."""
    section = {"teacher": report, "control": report.get("control")}.get(box) or (
        report.get("protections") or {}
    ).get(box)
    st = ((section or {}).get("students") or {}).get(arch)
    if not st or "margin" not in st:
        return None
    queries = (st.get("attacks") or {}).get(st.get("best_attack"), {}).get("queries")
    return (int(queries), st) if queries else None


def budget_curves(report: Mapping[str, Any], safe: int | None) -> tuple[Markup, list[dict[str, Any]]]:
    """The budget curve (the best knockoff's margin over the best LS student against the queries held, the
    unlimited attackers last) and the rows it is drawn from."""
    series, rows = [], []
    for box, curve in (report.get("budgets") or {}).items():
        archs = sorted({a for sec in curve.values() for a in sec.get("students", {})})
        for arch in archs:
            points = sorted(
                (int(b), sec["students"][arch]) for b, sec in curve.items() if arch in sec.get("students", {})
            )
            label = box_name(box) + (f" ({arch})" if len(archs) > 1 else "")
            unlimited = _unlimited(report, box, arch)
            if unlimited is not None:
                points.append(unlimited)
            series.append(Series(label, [b for b, _ in points], [st["margin"] for _, st in points]))
            rows += [
                {
                    "label": label,
                    "queries": b,
                    "unlimited": unlimited is not None and st is unlimited[1],
                    "student": st,
                    "best": st.get("attacks", {}).get(st.get("best_attack"), {}),
                }
                for b, st in points
            ]
    rules = [Rule(0.0, "best LS student")]
    if safe:
        rules.append(Rule(float(safe), f"safe budget {safe:,}", axis="x"))
    chart = line_chart(
        series,
        "Budget curve: best knockoff against the best LS student",
        "queries held by the attacker (log scale; last point: unlimited)",
        "margin (points)",
        log_x=True,
        rules=rules,
    )
    return Markup(chart), rows


def cmi_chart(report: Mapping[str, Any]) -> Markup:
    """I_T against the temperature, on the training and test sets, for the teacher and the CE control."""
    series = []
    for who, part in (("teacher", report.get("teacher")), ("control (CE)", report.get("control"))):
        for split in ("cmi_test", "cmi_train"):
            curve = (part or {}).get(split) or {}
            if curve:
                ts = sorted(curve, key=float)
                series.append(Series(f"{who} {split[4:]}", [float(t) for t in ts], [curve[t] for t in ts]))
    return Markup(
        line_chart(series, "I_T vs temperature", "temperature T (log scale)", "I_T (nats)", log_x=True)
    )


def training_charts(epochs: list[dict[str, Any]]) -> list[Markup]:
    """Accuracy (test and train) and the summed loss per epoch, per training stage."""
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for e in epochs:
        by_stage.setdefault(e.get("stage", "teacher"), []).append(e)
    acc, loss = [], []
    for stage, evs in by_stage.items():
        latest = {e["epoch"]: e for e in evs}  # a resumed attempt may repeat an epoch: keep the last
        xs = sorted(latest)
        acc.append(Series(f"{stage} test", xs, [latest[x]["test_acc"] for x in xs]))
        acc.append(Series(f"{stage} train", xs, [latest[x]["train_acc"] for x in xs]))
        loss.append(Series(stage, xs, [sum(latest[x]["losses"].values()) for x in xs]))
    return [
        Markup(line_chart(acc, "Training: accuracy", "epoch", "accuracy (%)")),
        Markup(line_chart(loss, "Training: loss", "epoch", "loss (sum of terms)")),
    ]


# The page's template, with what it calls to word a section and draw its charts.
PAGE = templates.env.get_template(
    "report.html",
    globals={f.__name__: f for f in (summary, against_ls, student_chart, box_name)}
    | {"css": Markup(CSS), "evidence_limits": EVIDENCE_LIMITS},
)


def render_report(job: JobOut, report: Mapping[str, Any] | BaseModel, epochs: list[dict[str, Any]]) -> str:
    """The page for a succeeded job: its report (the stored JSON, or the typed result) and the per-epoch
    events of its training."""
    data: Mapping[str, Any] = report if isinstance(report, Mapping) else report.model_dump(mode="json")
    found = data.get("findings") or findings(dict(data), job.spec)
    chart, rows = budget_curves(data, found.get("safe_budget"))
    return PAGE.render(job=job, report=data, found=found, budget_chart=chart, budget_rows=rows,
                       cmi_chart=cmi_chart(data), training_charts=training_charts(epochs))  # fmt: skip
