"""The report page: one verdict at the top, consistent with every row below it; why and what to change when
inconclusive; the budget curve with the safe budget, the honest-user cost and the next steps."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from audit_reports import BELOW, COPIED, report_of, rows

from app.services import report_page
from app.services.report_page import render_report
from app.services.schemas import JobOut, Progress
from ml.audit import AuditReport
from ml.audit.findings import findings

LINKS = ("self", "events", "report", "report_html", "artifacts", "model")


def page_job(spec: dict[str, Any]) -> JobOut:
    now = datetime.now(UTC)
    return JobOut(
        id=uuid.uuid4(), status="succeeded", attempts=1, max_attempts=3, error=None, cancel_requested=False,
        dataset_id=None, created_at=now, updated_at=now, started_at=now, finished_at=now,
        links=dict.fromkeys(LINKS, "/x"), spec=spec, progress=Progress(stage="succeeded", fraction=1.0),
    )  # fmt: skip


EPOCHS = [
    {"stage": "teacher", "epoch": e, "test_acc": 90.0 + e, "train_acc": 91.0 + e, "losses": {"ce": 1 / e}}
    for e in (1, 2, 3)
]


def page(report: dict[str, Any], spec: dict[str, Any] | None = None) -> str:
    return render_report(page_job(spec or {}), report, EPOCHS)


BUDGETS = {"teacher": {"4000": BELOW, "20000": BELOW}, "control": {"4000": BELOW, "20000": COPIED}}


def test_page_has_budget_curve_honest_cost_and_next_steps() -> None:
    report = report_of(BELOW, COPIED, budgets=BUDGETS)
    html = page(report)
    f = findings(report)
    assert html.count('class="headline') == 1 and 'class="headline undistillable"' in html
    assert "Budget curve: best knockoff against the best LS student" in html
    assert "safe budget 20,000" in html and "<strong>20,000 queries per key</strong>" in html
    curve = re.search(r"<svg[^>]*><title>Budget curve.*?</svg>", html, re.S)
    assert curve and curve.group(0).count("<polyline") == 2  # the teacher's and the CE control's curves
    assert "honest users' accuracy as served</td><td>98.09</td>" in html
    assert "<h2>Next steps</h2>" in html
    assert html.count("<li>", html.index("<h2>Next steps</h2>")) >= len(f["next_steps"])
    assert "Serve it as audited: labels only" in html and "<code>CMIM_MODEL_QUERY_BUDGET</code>" in html
    assert "What this protection stops and what it does not" in html and "<script" not in html


def test_inconclusive_page_says_why_and_what_would_make_it_conclusive() -> None:
    report = report_of(BELOW, BELOW, epochs=20, seeds=2, task_seconds=120.0)
    html = page(report)
    assert 'class="headline inconclusive"' in html and "<h2>What would make it conclusive</h2>" in html
    assert "not copied at 20 epochs" in html and "about 75 minutes on this worker" in html
    assert "CE control check: failed" in html
    quick = page(report_of(BELOW, COPIED, epochs=150), {"preset": "quick"})
    assert "Indicative only" in quick and "cannot show that a model is undistillable" in quick
    assert "<h2>What would confirm it</h2>" in quick and "Run the standard audit" in quick


def test_rows_never_contradict_the_verdict() -> None:
    """No per-student verdict badges: every row reads copied / within noise / not copied, as the verdict."""
    ahead = rows(hard_label=[70.0, 71.0, 70.5, 69.5, 70.0], fm=[80.0, 82.5, 80.5, 81.5, 79.5])
    for teacher, control, verdict in (
        (BELOW, BELOW, "inconclusive"),  # every row below LS, yet inconclusive: the control was not copied
        (BELOW, COPIED, "undistillable"),
        (ahead, COPIED, "inconclusive"),
        (COPIED, COPIED, "distillable"),
    ):
        report = report_of(teacher, control)
        html = page(report)
        assert report["verdict"] == verdict and f'class="headline {verdict}"' in html
        assert 'class="verdict' not in html  # the old per-student badges
        teacher_part = html[html.index("Knockoff students against") : html.index("CE control check")]
        outcomes = re.findall(r'<span class="(copied|within_noise|not_copied)">', teacher_part)
        assert len(outcomes) == 2
        assert ("copied" in outcomes) == (verdict == "distillable")
        assert ("within_noise" in outcomes) == (teacher is ahead)
        if verdict != "distillable":
            assert "copied beyond LS (significant after Holm)" not in teacher_part


HOSTILE = '<script>alert("x")</script>'


def test_hostile_names_in_a_report_come_out_escaped() -> None:
    """A dataset, attack row, student and mechanism named with markup are shown as text, in tables and
    charts alike: the page runs nothing a report carries."""
    report = report_of(rows(hard_label=[70.0, 71.0, 70.5, 69.5, 70.0], **{HOSTILE: [84.0] * 5}), COPIED)
    report["students"] = {f"mlp{HOSTILE}": report["students"]["mlp"]}
    report["dataset"] = {"name": f"mnist{HOSTILE}", "n_train": 10, "n_test": 10}
    report["verdict_reason"] = f"because {HOSTILE}"
    report["evidence"] = {
        "mechanisms": {HOSTILE: {"teacher": {"mlp": {"null": None, "reason": HOSTILE}}}},
        "commitment": {"sha256": HOSTILE, "committed_at": "2026-01-01"},
        "limits": HOSTILE,
    }
    html = page(report)
    assert "<script" not in html and "alert(" in html
    escaped = html.count("&lt;script&gt;")
    assert escaped >= 10, escaped  # tables, headings, facts, evidence, and the charts' labels and titles
    assert re.search(r"<svg[^>]*><title>teacher: knockoff mlp&lt;script&gt;", html)


def test_the_page_reads_the_findings_the_report_carries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker stores the findings with the report: the page shows them and computes none of its own."""
    report = report_of(BELOW, COPIED)
    report["findings"] = findings(report) | {"headline": "Stored headline with `code`."}

    def recompute(*_: Any) -> None:
        raise AssertionError("findings recomputed on render")

    monkeypatch.setattr(report_page, "findings", recompute)
    html = page(report)
    assert "Stored headline with <code>code</code>." in html


def test_charts_appear_inline_for_a_stored_report() -> None:
    """A seeded job's published report (as stored): every chart is inline SVG with data, nothing fetched."""
    report = json.loads((Path(__file__).parent / "seeded_report.json").read_text())
    html = page(report)
    titles = re.findall(r"<svg[^>]*><title>([^<]+)</title>", html)
    assert {"Budget curve: best knockoff against the best LS student", "I_T vs temperature"} <= set(titles)
    assert {"Training: accuracy", "Training: loss"} <= set(titles)
    assert sum(t.endswith("vs the best LS student") for t in titles) == 2  # the teacher's and the control's
    assert html.count("<polyline") >= 5 and "no data" not in html
    assert f'class="headline {report["verdict"]}"' in html and "<h2>Evidence of theft</h2>" in html
    assert "src=" not in html and "<link" not in html and "<script" not in html


def test_the_typed_audit_result_renders_the_page_of_its_json() -> None:
    """The template reads `report.x`: the typed result (ml.audit.AuditReport) and the JSON it serialises to
    give the same page."""
    stored = json.loads((Path(__file__).parent / "seeded_report.json").read_text())
    typed = AuditReport.model_validate(stored)
    job = page_job({})
    assert render_report(job, typed, EPOCHS) == render_report(job, stored, EPOCHS)
