"""The report page: one verdict at the top, consistent with every row below it; why and what to change when
inconclusive; the budget curve with the safe budget, the honest-user cost and the next steps."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from audit_reports import BELOW, COPIED, report_of, rows

from app.api.report_html import render_report
from app.services.schemas import JobOut, Progress
from ml.audit.advice import findings

LINKS = ("self", "events", "report", "report_html", "artifacts", "model")


def page(report: dict[str, Any], spec: dict[str, Any] | None = None) -> str:
    now = datetime.now(UTC)
    job = JobOut(
        id=uuid.uuid4(), status="succeeded", attempts=1, max_attempts=3, error=None, cancel_requested=False,
        dataset_id=None, created_at=now, updated_at=now, started_at=now, finished_at=now,
        links=dict.fromkeys(LINKS, "/x"), spec=spec or {},
        progress=Progress(stage="succeeded", fraction=1.0),
    )  # fmt: skip
    epochs = [
        {"stage": "teacher", "epoch": e, "test_acc": 90.0 + e, "train_acc": 91.0 + e, "losses": {"ce": 1 / e}}
        for e in (1, 2, 3)
    ]
    return render_report(job, report, epochs)


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
