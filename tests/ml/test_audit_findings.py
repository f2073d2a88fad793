"""The verdict rule with Holm's adjustment, and the findings a report gives its owner: one verdict in plain
words, why, what would make it conclusive (with the time it would take), the serving cost, next steps."""

from __future__ import annotations

import json
import math

import pytest
from audit_reports import BELOW, COPIED, LS, report_of, rows

from ml.audit import AuditConfig, run_audit, summarise
from ml.audit.findings import DISCRIMINATING_EPOCHS, VERDICT_SEEDS, findings, indicative
from ml.audit.stats import holm, seeds_to_resolve, welch_one_sided
from ml.audit.verdict import audit_verdict, judge, judge_black_box


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.02, 0.5 -> 3 x 0.01 = 0.03, 2 x 0.02 = 0.04, 1 x 0.5 = 0.5 (monotone, capped at 1)
    assert holm([0.02, 0.01, 0.5]) == pytest.approx([0.04, 0.03, 0.5])
    assert holm([0.03, 0.01, 0.04]) == pytest.approx([0.06, 0.03, 0.06])  # 2 x 0.03 = 0.06 > 1 x 0.04
    assert holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])
    assert holm([]) == []


def test_a_gain_significant_alone_is_not_significant_among_17_rows() -> None:
    ls = rows(ls=LS)
    gain = [81.5, 82.0, 80.5, 81.5, 80.5]  # +1.0 point over LS, one-sided Welch p about 0.018
    p = welch_one_sided(gain, LS)
    assert 0.01 < p < 0.05
    alone = judge(ls, rows(fm=gain), 0.05)
    assert alone["verdict"] == "distillable" and alone["copied_by"] == ["fm"]
    others = {f"kd_{i}": [70.0 + i / 10, 71.0, 70.5, 69.5, 70.0] for i in range(16)}
    attacks = rows(fm=gain, **others)
    many = judge(ls, attacks, 0.05)
    # the smallest of 17 p-values is multiplied by 17: 17 p > 0.05, so the gain is within noise
    assert attacks["fm"]["p_holm"] == pytest.approx(min(1.0, 17 * p))
    assert attacks["fm"]["significant"] and not attacks["fm"]["significant_holm"]
    assert attacks["fm"]["outcome"] == "within_noise" and attacks["kd_3"]["outcome"] == "not_copied"
    assert many["verdict"] == "inconclusive" and "Holm-adjusted over 17 attack rows" in many["reason"]


def test_holm_runs_over_every_row_of_a_black_box_and_any_copied_row_decides() -> None:
    strong = [90.0, 91.0, 90.5, 89.5, 90.0]
    a_ls, a_att = rows(ls=LS), rows(fm=strong, kd=[79.0, 80.0, 79.5, 78.5, 79.0])
    b_ls, b_att = rows(ls=LS), rows(fm=[79.0, 80.0, 79.5, 78.5, 79.0], kd=[78.0, 79.0, 78.5, 77.5, 78.0])
    out = judge_black_box({"mlp": (a_ls, a_att), "cnn": (b_ls, b_att)}, 0.05)
    family = [a_att["fm"], a_att["kd"], b_att["fm"], b_att["kd"]]
    assert [r["p_holm"] for r in family] == pytest.approx(holm([r["p_value"] for r in family]))
    assert out["mlp"]["verdict"] == "distillable" and out["cnn"]["verdict"] == "undistillable"
    # a row that is not the best mean but is Holm-significant makes the student distillable
    noisy_best = [70.0, 99.0, 72.0, 98.0, 85.0]  # mean 84.8, huge spread
    att = rows(fm=noisy_best, kd=[83.0, 84.0, 83.5, 82.5, 83.0])
    j = judge(rows(ls=LS), att, 0.05)
    assert j["best_attack"] == "fm" and att["fm"]["outcome"] == "within_noise"
    assert j["verdict"] == "distillable" and j["copied_by"] == ["kd"] and j["reason"].startswith("kd ")


def test_verdict_needs_a_control_found_distillable() -> None:
    assert audit_verdict("undistillable", "distillable") == ("undistillable", "")
    assert audit_verdict("undistillable", "undistillable")[0] == "inconclusive"
    assert audit_verdict("undistillable", None)[0] == "inconclusive"
    assert audit_verdict("distillable", "inconclusive") == ("distillable", "")
    assert audit_verdict("distillable", None)[0] == "distillable"


def test_seeds_to_resolve_by_hand() -> None:
    # margin 1, stds 1 and 1: n = 6 gives t(0.95, 10) sqrt(2/6) = 1.812 x 0.577 = 1.046 > 1;
    # n = 7 gives t(0.95, 12) sqrt(2/7) = 1.782 x 0.535 = 0.952 <= 1
    assert seeds_to_resolve(1.0, 1.0, 1.0, 0.05) == 7
    assert seeds_to_resolve(-1.0, 1.0, 1.0, 0.05) is None
    assert seeds_to_resolve(0.01, 5.0, 5.0, 0.05) is None  # beyond 100 seeds


def test_inconclusive_when_the_control_is_not_copied_says_why_and_what_to_change() -> None:
    report = report_of(BELOW, BELOW, epochs=20, seeds=2, task_seconds=120.0)
    assert report["verdict"] == "inconclusive"
    f = findings(report)
    assert f["headline"].startswith("Inconclusive: ") and "CE control was not copied" in f["headline"]
    assert f["control_check"]["status"] == "failed"
    assert any(
        "not copied at 20 epochs" in s and f"about {DISCRIMINATING_EPOCHS} epochs" in s
        for s in f["to_conclude"]
    )
    # the estimate scales the measured 120 s by (300 x 5) / (20 x 2) = 37.5: 75 minutes
    assert f["suggested_audit"] == {
        "epochs": 300,
        "seeds": VERDICT_SEEDS,
        "estimated_minutes": pytest.approx(75.0),
    }
    assert any("about 75 minutes on this worker" in s for s in f["to_conclude"])
    assert f["indicative"] and "far below" in f["indicative"] and "Indicative only" in f["headline"]
    assert f["next_steps"][0].startswith("Do not read this audit as a pass")


def test_within_noise_asks_for_the_seeds_that_would_resolve_it() -> None:
    ahead = rows(hard_label=[70.0, 71.0, 70.5, 69.5, 70.0], fm=[80.0, 82.5, 80.5, 81.5, 79.5])
    report = report_of(ahead, COPIED)
    f = findings(report)
    row = report["students"]["mlp"]["attacks"]["fm"]
    assert report["verdict"] == "inconclusive" and row["outcome"] == "within_noise"
    need = seeds_to_resolve(row["margin"], row["acc_best"]["std"], summarise(LS)["std"], 0.05 / 2)
    assert need is not None and need > 5
    assert f["suggested_audit"]["seeds"] == need and f["suggested_audit"]["epochs"] == 300
    assert any(f"Run about {need} seeds" in s for s in f["to_conclude"])
    assert "fm (mlp students) is ahead" in f["headline"] and f["indicative"] is None
    assert any("fm, ahead here by" in s for s in f["next_steps"])


def test_undistillable_tells_how_to_serve_and_what_is_not_stopped() -> None:
    budgets = {"teacher": {"4000": BELOW, "20000": BELOW}, "control": {"4000": BELOW, "20000": COPIED}}
    report = report_of(BELOW, COPIED, budgets=budgets)
    f = findings(report)
    assert report["verdict"] == f["verdict"] == "undistillable" and f["headline"].startswith("Undistillable")
    assert (
        f["to_conclude"] == [] and f["suggested_audit"] is None and f["control_check"]["status"] == "passed"
    )
    assert f["safe_budget"] == 20000
    steps = " ".join(f["next_steps"])
    assert "Serve it as audited: labels only" in steps and "safe budget, 20,000 queries" in steps
    assert "many keys" in steps and "within noise" in steps and "does not show" not in steps
    assert "98.09 % right answers (the model itself: 98.10 %)" in f["serving"]["text"]


def test_distillable_says_do_not_serve_as_audited() -> None:
    report = report_of(COPIED, COPIED)
    report["threat_model"]["output_mode"]["kind"] = "probs"
    f = findings(report)
    assert f["verdict"] == "distillable" and f["to_conclude"] == []
    assert "fm knockoffs (mlp students) reach 84.20 % against 80.20 %" in f["why"][0]
    assert (
        f["next_steps"][0].startswith("Do not rely on this protection")
        and "labels only" in f["next_steps"][1]
    )


def test_no_control_and_one_seed_are_inconclusive_for_their_own_reasons() -> None:
    f = findings(report_of(BELOW, None))
    assert f["verdict"] == "inconclusive" and f["control_check"]["status"] == "not_run"
    assert any("control_arch" in s for s in f["to_conclude"])
    one = rows(fm=[79.0])
    f1 = findings(report_of(one, one, seeds=1, ls_values=[80.0]))
    assert "only 1 seed was run" in f1["headline"] and f1["suggested_audit"]["seeds"] == VERDICT_SEEDS


def test_indicative_from_the_job_or_the_schedule() -> None:
    report = report_of(BELOW, COPIED, epochs=150)
    assert indicative(report) is None
    assert indicative(report, {"preset": "quick"}) and indicative(report, {"audit": {"indicative": True}})
    assert indicative(report, {"preset": "standard"}) is None
    report["config"]["indicative"] = True
    assert "marked indicative" in indicative(report)
    f = findings(report, {"preset": "quick"})
    assert f["verdict"] == "undistillable" and "cannot show that a model is undistillable" in f["headline"]
    assert any("Run the standard audit" in s for s in f["to_conclude"])
    assert indicative(report_of(BELOW, COPIED, epochs=60)) is not None  # a fifth of the schedule


def test_every_row_outcome_agrees_with_its_verdict(data, teachers) -> None:
    """A small seeded audit: the per-row outcomes, the students' verdicts, the report's verdict and its
    findings never contradict each other; an inconclusive report says why and what to change."""
    cfg = AuditConfig(
        seeds=2, epochs=2, attacks=["hard_label", "fm"], ls_eps=[0.0, 0.1], ls_mixup=False,
        query_budgets=[150, 600], device="cpu",
    )  # fmt: skip
    report = run_audit(cfg, teachers[0], data, control=teachers[1])
    sections = [report, report["control"], *report["budgets"]["teacher"].values()]
    for section in sections:
        for s in section["students"].values():
            outcomes = {r["outcome"] for r in s["attacks"].values()}
            assert (s["verdict"] == "distillable") == ("copied" in outcomes)
            assert (s["verdict"] == "undistillable") == (outcomes == {"not_copied"})
            assert s["copied_by"] == sorted(
                (n for n, r in s["attacks"].items() if r["outcome"] == "copied"),
                key=lambda n: s["attacks"][n]["p_holm"],
            )
    assert report["findings"] == json.loads(json.dumps(findings(report)))  # pure, JSON as stored
    f = report["findings"]
    assert f["verdict"] == report["verdict"] and f["headline"].lower().startswith(report["verdict"])
    assert report["control"]["verdict"] != "distillable"  # the premise: 2 epochs copy nothing
    assert report["verdict"] == "inconclusive"
    assert any(f"not copied at {cfg.epochs} epochs" in s for s in f["to_conclude"])
    timing = report["timing"]
    assert timing["task_seconds"] > 0 and timing["epoch_units"] == 2 * (2 + 2 * 2 + 2)  # + the null's task
    expected = (
        timing["task_seconds"] * (DISCRIMINATING_EPOCHS * VERDICT_SEEDS) / (cfg.epochs * cfg.seeds) / 60
    )
    assert f["suggested_audit"]["estimated_minutes"] == pytest.approx(expected)
    assert math.isclose(f["safe_budget"], min(report["safe_budget"]["teacher"].values()))


def test_within_noise_and_an_uncopied_control_name_both_causes() -> None:
    ahead = rows(hard_label=[70.0, 71.0, 70.5, 69.5, 70.0], fm=[80.0, 82.5, 80.5, 81.5, 79.5])
    f = findings(report_of(ahead, BELOW, epochs=200))
    assert f["verdict"] == "inconclusive" and f["headline"].startswith(
        "Inconclusive: fm (mlp students) is ahead"
    )
    assert f["why"][1].startswith("Also, the plain CE control was not copied either at 200 epochs")
    assert any("Run about" in s for s in f["to_conclude"])
    assert any("not copied at 200 epochs" in s for s in f["to_conclude"])
    assert f["suggested_audit"]["epochs"] == DISCRIMINATING_EPOCHS
