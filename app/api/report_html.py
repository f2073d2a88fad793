"""The audit report as one self-contained HTML page: verdict, tables, inline SVG plots."""

from __future__ import annotations

import math
import re
from html import escape
from typing import Any

from app.api.schemas import JobOut
from ml.audit.advice import OUTCOME_LABELS, findings
from ml.audit.verdict import outcome
from ml.charts import Bar, Rule, Series, bar_chart, line_chart
from ml.evidence.audit import EVIDENCE_LIMITS

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child,td:last-child{text-align:left}
code{background:#f3f3f3;padding:0 .2em}.headline code{background:none;color:inherit}
.headline{padding:.7em 1em;border-radius:6px;color:#fff;font-size:1.1em;font-weight:bold}
.headline.undistillable{background:#2a7d2a}.headline.distillable{background:#b22}
.headline.inconclusive{background:#a67c00}
.copied{color:#b22;font-weight:bold}.within_noise{color:#a67c00}.not_copied{color:#2a7d2a}
.charts{display:flex;flex-wrap:wrap;gap:1em}.muted{color:#666}
"""


def _num(v: Any, digits: int = 2) -> str:
    if isinstance(v, int | float) and math.isfinite(v):
        return f"{v:.{digits}f}"
    return "–"


def _pm(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    return f"{_num(stats.get('mean'))} ± {_num(stats.get('se'))}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _text(s: str) -> str:
    """Plain text from the findings, escaped, with `code` spans shown as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(s))


def _list(items: list[str], ordered: bool = False) -> str:
    tag = "ol" if ordered else "ul"
    return f"<{tag}>" + "".join(f"<li>{_text(i)}</li>" for i in items) + f"</{tag}>"


def _against_ls(row: dict[str, Any]) -> str:
    """A row against the best LS student: copied, within noise or not copied (after Holm), in words."""
    if "margin" not in row:
        return "–"
    kind = row.get("outcome") or outcome(row)
    return f'<span class="{escape(kind)}">{escape(OUTCOME_LABELS[kind])}</span>'


def _summary(s: dict[str, Any]) -> str:
    """A student section in words, without a verdict of its own: the report states one verdict, at the top."""
    rows = s.get("attacks", {})
    copied = s.get("copied_by") or [n for n, r in rows.items() if r.get("outcome") == "copied"]
    if copied:
        return "copied beyond the best LS student by " + ", ".join(copied)
    ahead = [n for n, r in rows.items() if r.get("margin", 0) > 0]
    if ahead:
        return "ahead of the best LS student within noise: " + ", ".join(ahead)
    return "no knockoff ahead of the best LS student"


def _student_section(arch: str, s: dict[str, Any], who: str) -> str:
    ls, attacks = s.get("ls", {}), s.get("attacks", {})
    best_ls = s.get("best_ls")
    rows = [
        [escape(n) + (" (best LS)" if n == best_ls else ""), _pm(r.get("acc_best")), _pm(r.get("acc_last"))]
        + ["–"] * 5
        for n, r in ls.items()
    ]
    rows += [
        [
            escape(n),
            _pm(r.get("acc_best")),
            _pm(r.get("acc_last")),
            _pm(r.get("fidelity")),
            f"{_num(r.get('margin'))} ± {_num(r.get('margin_se'))}",
            _num(r.get("p_value"), 3),
            _num(r.get("p_holm"), 3),
            _against_ls(r),
        ]
        for n, r in attacks.items()
    ]
    bars = (
        [Bar(f"LS {best_ls}", ls[best_ls]["acc_best"]["mean"], ls[best_ls]["acc_best"].get("se", 0.0), True)]
        if best_ls in ls
        else []
    )
    bars += [Bar(n, r["acc_best"]["mean"], r["acc_best"].get("se", 0.0)) for n, r in attacks.items()]
    chart = bar_chart(
        bars,
        f"{who}: knockoff {arch} students vs the best LS student",
        "test accuracy (%), mean ± s.e. over seeds",
        reference=ls[best_ls]["acc_best"]["mean"] if best_ls in ls else None,
    )
    headers = ["row", "best-epoch acc", "last-epoch acc", "fidelity", "margin vs best LS", "p (Welch)"]
    return f"<h3>{escape(who)} · student {escape(arch)}: {escape(_summary(s))}</h3>{chart}" + _table(
        [*headers, "p (Holm)", "against the best LS student"], rows
    )


def _unlimited(report: dict[str, Any], box: str, arch: str) -> tuple[int, dict[str, Any]] | None:
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


def _budget_section(report: dict[str, Any], found: dict[str, Any]) -> str:
    """The budget curve (best knockoff's margin over the best LS student against queries held) and the
    safe budget, with the table it is drawn from."""
    budgets = report.get("budgets") or {}
    if not budgets:
        return (
            "<h2>Query budget</h2><p>This audit tested no query budgets, so it measured no safe per-key "
            "budget (<code>audit.query_budgets</code>).</p>"
        )
    series, rows = [], []
    for box, curve in budgets.items():
        archs = sorted({a for sec in curve.values() for a in sec.get("students", {})})
        for arch in archs:
            points = sorted(
                (int(b), sec["students"][arch]) for b, sec in curve.items() if arch in sec.get("students", {})
            )
            label = ("CE control" if box == "control" else box) + (f" ({arch})" if len(archs) > 1 else "")
            unlimited = _unlimited(report, box, arch)
            if unlimited is not None:
                points.append(unlimited)
            series.append(Series(label, [b for b, _ in points], [st["margin"] for _, st in points]))
            for b, st in points:
                best = st.get("attacks", {}).get(st.get("best_attack"), {})
                rows.append(
                    [
                        escape(label),
                        f"{b:,}" + (" (unlimited)" if unlimited and st is unlimited[1] else ""),
                        escape(str(st.get("best_attack", "–"))),
                        _pm(best.get("acc_best")),
                        f"{_num(st.get('margin'))} ± {_num(st.get('margin_se'))}",
                        escape(_summary(st)),
                    ]
                )
    safe = found.get("safe_budget")
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
    per_box = "; ".join(
        f"{'CE control' if box == 'control' else box}: "
        + ", ".join(f"{b:,}" + (f" ({a})" if len(v) > 1 else "") for a, b in v.items())
        for box, v in (report.get("safe_budget") or {}).items()
    )
    text = (
        f"The safe budget is <strong>{safe:,} queries per key</strong>: the largest tested budget at "
        "which no knockoff's mean beat the best label-smoothing student. It is the served model's default "
        "per-key budget."
        if safe
        else "No tested budget was safe: a knockoff beat the best label-smoothing student at the smallest "
        "one."
    )
    return (
        f"<h2>Query budget</h2><p>{text}</p><div class=charts>{chart}</div>"
        + _table(["black box", "queries B", "best knockoff", "its acc", "margin vs best LS", "at B"], rows)
        + f"<p class=muted>Safe budgets per black box: {escape(per_box)}.</p>"
    )


def _serving_section(report: dict[str, Any], found: dict[str, Any]) -> str:
    srv = found["serving"]
    cost = srv.get("honest_cost") or {}
    table = _table(
        ["", "percent"],
        [
            ["the model's own accuracy", _num(srv.get("teacher_accuracy"))],
            ["honest users' accuracy as served", _num(cost.get("accuracy"))],
            ["calibration error (ECE) as served", _num(cost.get("ece"))],
            ["clean queries refused", _num(cost.get("refused"))],
            ["clean queries altered", _num(cost.get("altered"))],
        ],
    )
    statement = (report.get("statement") or {}).get("text", "not stated (an older report)")
    return (
        f"<h2>Serving: {escape(str(srv.get('served_as')))}</h2><p>{escape(srv['text'])}</p>{table}"
        f"<p><strong>What this protection stops and what it does not:</strong> {escape(str(statement))}</p>"
    )


def _evidence_section(report: dict[str, Any], job_id: str) -> str:
    """The evidence of theft the audit measured, the secret's commitment, and what it can and cannot show."""
    ev = report.get("evidence")
    if not ev:
        return ""
    rows = []
    for mech, boxes in ev.get("mechanisms", {}).items():
        for box, per_arch in boxes.items():
            if box == "serving":
                continue
            for arch, sec in per_arch.items():
                which = [escape(mech), escape(box), escape(arch)]
                if sec.get("null") is None:
                    rows.append([*which, escape(sec.get("reason", "")), "", "", ""])
                    continue
                families = sec["null"].items()
                null = ", ".join(f"{escape(f)} {n['mean']:.3f} ± {n['std']:.3f}" for f, n in families)
                near = sec.get("tpr_near_ls_unlimited")
                rows.append([
                    *which, null, _num(sec.get("fpr")),
                    _num(sec.get("tpr_unlimited")),
                    "–" if near is None else f"{near:.2f} ({sec.get('near_ls_unlimited', 0)})",
                ])  # fmt: skip
    commit = ev.get("commitment", {})
    sha, at = escape(str(commit.get("sha256", ""))), escape(str(commit.get("committed_at", "")))
    table = _table(
        ["mechanism", "black box", "student", "independent models' agreement", "false positives",
         "knockoffs detected", "near-LS knockoffs detected (n)"],
        rows,
    )  # fmt: skip
    return (
        f"<h2>Evidence of theft</h2><p>The evidence secret was committed before serving: sha256 "
        f"<code>{sha}</code> at {at}. "
        f"To test a suspect: <code>GET /api/v1/models/{escape(job_id)}/challenge</code>, then "
        f"<code>POST /api/v1/models/{escape(job_id)}/verify</code> with its answers or an uploaded model "
        f"(alpha {_num(ev.get('alpha'), 3)}, {escape(str(ev.get('points', '?')))} challenge points).</p>"
        f"{table}<p>{escape(ev.get('limits') or EVIDENCE_LIMITS)}</p>"
    )


def _cmi_chart(report: dict[str, Any]) -> str:
    series = []
    for who, part in (("teacher", report.get("teacher")), ("control (CE)", report.get("control"))):
        for split in ("cmi_test", "cmi_train"):
            curve = (part or {}).get(split) or {}
            if curve:
                ts = sorted(curve, key=float)
                series.append(Series(f"{who} {split[4:]}", [float(t) for t in ts], [curve[t] for t in ts]))
    return line_chart(series, "I_T vs temperature", "temperature T (log scale)", "I_T (nats)", log_x=True)


def _training_charts(epochs: list[dict[str, Any]]) -> str:
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
    return line_chart(acc, "Training: accuracy", "epoch", "accuracy (%)") + line_chart(
        loss, "Training: loss", "epoch", "loss (sum of terms)"
    )


def render_report(job: JobOut, report: dict[str, Any], epochs: list[dict[str, Any]]) -> str:
    """The page for a succeeded job: its report and the per-epoch events of its training."""
    found = findings(report, job.spec)
    verdict = found["verdict"]
    teacher, control = report.get("teacher", {}), report.get("control")
    meta = teacher.get("meta", {})
    tm = report.get("threat_model", {})
    data = report.get("dataset", {})
    timing = report.get("timing") or {}
    measured = timing.get("task_seconds") or report.get("wall_s")
    sizes = f"{data.get('n_train', '?')} train / {data.get('n_test', '?')} test"
    objective = f"objective {meta.get('objective', '?')} {meta.get('objective_params', '')}"
    schedule = f"{tm.get('epochs', '?')} epochs, {report.get('config', {}).get('seeds', '?')} seeds"
    facts = [
        ["job", escape(str(job.id))],
        ["dataset", escape(f"{data.get('name', '')} ({sizes})")],
        ["teacher", escape(f"{meta.get('arch', '?')}, {objective}")],
        ["teacher accuracy", _num(teacher.get("accuracy"))],
        ["CE control accuracy", _num(control.get("accuracy")) if control else "not run"],
        ["output mode (as served)", escape(str(tm.get("output_mode", "")))],
        ["attacker's labelled samples", escape(str(tm.get("labelled_samples", "?")))],
        ["attack schedule", escape(schedule)],
        ["audit time (its tasks, one after another)", f"{_num(measured, 0)} s"],
        ["the verdict's rule, row by row", escape(str(report.get("verdict_reason", "")))],
    ]
    title = "What would make it conclusive" if verdict == "inconclusive" else "What would confirm it"
    conclude = f"<h2>{title}</h2>" + _list(found["to_conclude"]) if found["to_conclude"] else ""
    sections = [_student_section(a, s, "teacher") for a, s in report.get("students", {}).items()]
    check = found["control_check"]
    status = escape(check["status"].replace("_", " "))
    sections.append(f"<h2>CE control check: {status}</h2><p>{escape(check['text'])}</p>")
    if control:
        sections += [_student_section(a, s, "CE control") for a, s in control.get("students", {}).items()]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cmim audit {escape(str(job.id))}: {escape(verdict)}</title>
<style>{CSS}</style></head><body>
<h1>Audit report</h1>
<div class="headline {escape(verdict)}">{_text(found["headline"])}</div>
{_list([w for w in found["why"] if w[1:] not in found["headline"]])}
{conclude}
<h2>Next steps</h2>
{_list(found["next_steps"], ordered=True)}
{_serving_section(report, found)}
{_budget_section(report, found)}
{_evidence_section(report, str(job.id))}
<h2>Knockoff students against the teacher as served</h2>
<p class=muted>Each attack row is a knockoff trained against the served model, compared with the best
label-smoothing (LS) student trained on the attacker's labelled data alone. "Copied" needs the gain to
stay significant after Holm's adjustment over all attack rows; p-values are one-sided Welch tests.</p>
{"".join(sections)}
<h2>Conditional mutual information of the output clusters</h2>
<div class="charts">{_cmi_chart(report)}</div>
<h2>Training</h2>
<div class="charts">{_training_charts(epochs)}</div>
<h2>Audit facts</h2>
{_table(["", ""], facts)}
<p class="muted">Report format version {escape(str(report.get("version", "?")))}; the JSON is at
<a href="/api/v1/jobs/{escape(str(job.id))}/report">/api/v1/jobs/{escape(str(job.id))}/report</a>.</p>
</body></html>"""
