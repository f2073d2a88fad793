"""The audit report as one self-contained HTML page: verdict, tables, inline SVG plots."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from app.api.schemas import JobOut
from app.api.svg import Bar, Series, bar_chart, line_chart

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.verdict{display:inline-block;padding:.2em .7em;border-radius:4px;color:#fff;font-weight:bold}
.undistillable{background:#2a7d2a}.distillable{background:#b22}.inconclusive{background:#a67c00}
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


def _verdict(v: str | None) -> str:
    v = v or "unknown"
    return f'<span class="verdict {escape(v)}">{escape(v)}</span>'


def _student_section(arch: str, s: dict[str, Any], who: str) -> str:
    ls, attacks = s.get("ls", {}), s.get("attacks", {})
    best_ls = s.get("best_ls")
    rows = [
        [
            escape(n) + (" (best LS)" if n == best_ls else ""),
            _pm(r.get("acc_best")),
            _pm(r.get("acc_last")),
            "–",
            "–",
            "–",
            "–",
        ]
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
            "yes" if r.get("significant") else "no",
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
    return (
        f"<h3>{escape(who)} · student {escape(arch)} {_verdict(s.get('verdict'))}</h3>"
        f"<p>{escape(str(s.get('reason', '')))}</p>{chart}"
        + _table(
            [
                "row",
                "best-epoch acc",
                "last-epoch acc",
                "fidelity",
                "margin vs best LS",
                "p (Welch)",
                "significant",
            ],
            rows,
        )
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
    teacher, control = report.get("teacher", {}), report.get("control")
    meta = teacher.get("meta", {})
    tm = report.get("threat_model", {})
    facts = [
        ["job", escape(str(job.id))],
        [
            "dataset",
            escape(
                f"{report.get('dataset', {}).get('name', '')} "
                f"({report.get('dataset', {}).get('n_train', '?')} train / "
                f"{report.get('dataset', {}).get('n_test', '?')} test)"
            ),
        ],
        [
            "teacher",
            escape(
                f"{meta.get('arch', '?')}, objective {meta.get('objective', '?')} "
                f"{meta.get('objective_params', '')}"
            ),
        ],
        ["teacher accuracy", _num(teacher.get("accuracy"))],
        ["CE control accuracy", _num(control.get("accuracy")) if control else "not run"],
        ["output mode (as served)", escape(str(tm.get("output_mode", "")))],
        ["attacker's labelled samples", escape(str(tm.get("labelled_samples", "?")))],
        ["attack schedule (epochs)", escape(str(tm.get("epochs", "?")))],
        ["audit wall time", f"{_num(report.get('wall_s'), 0)} s"],
    ]
    sections = [_student_section(a, s, "teacher") for a, s in report.get("students", {}).items()]
    if control:
        sections.append(
            f"<h2>CE control {_verdict(control.get('verdict'))}</h2>"
            "<p class=muted>The same audit against a plain CE teacher of the same architecture: "
            "it should be found distillable, or the audit cannot discriminate.</p>"
        )
        sections += [_student_section(a, s, "control") for a, s in control.get("students", {}).items()]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cmim audit {escape(str(job.id))}</title>
<style>{CSS}</style></head><body>
<h1>Audit report {_verdict(report.get("verdict"))}</h1>
<p>{escape(str(report.get("verdict_reason", "")))}</p>
<p><strong>What this protection stops and what it does not:</strong>
{escape(str(report.get("statement", {}).get("text", "not stated (an older report)")))}</p>
{_table(["", ""], facts)}
<h2>Knockoff students against the teacher as served</h2>
{"".join(sections)}
<h2>Conditional mutual information of the output clusters</h2>
<div class="charts">{_cmi_chart(report)}</div>
<h2>Training</h2>
<div class="charts">{_training_charts(epochs)}</div>
<p class="muted">Report format version {escape(str(report.get("version", "?")))}; the JSON is at
<a href="/api/v1/jobs/{escape(str(job.id))}/report">/api/v1/jobs/{escape(str(job.id))}/report</a>.</p>
</body></html>"""
