"""Audit reports built from rows of per-seed accuracies, as `assemble` writes them (with an extra section
the report code must tolerate): for the findings and the report page."""

from __future__ import annotations

import json
from typing import Any

from ml.audit import summarise
from ml.audit.verdict import audit_verdict, judge, safe_budget

LS = [80.0, 81.0, 80.5, 79.5, 80.0]


def rows(**accs: list[float]) -> dict[str, dict[str, Any]]:
    return {
        name: {"acc_best": summarise(a), "acc_last": summarise(a), "queries": 1000}
        for name, a in accs.items()
    }


def report_of(
    teacher: dict[str, dict[str, Any]],
    control: dict[str, dict[str, Any]] | None,
    *,
    epochs: int = 300,
    seeds: int = 5,
    budgets: dict[str, dict[str, dict[str, Any]]] | None = None,
    task_seconds: float | None = 600.0,
    ls_values: list[float] = LS,
) -> dict[str, Any]:
    """A report as assemble writes it, from rows: what the findings read, and extra keys they must ignore."""
    ls = rows(ls_0=[a - 1 for a in ls_values], ls_0_1=ls_values)

    def section(attacks: dict[str, dict[str, Any]]) -> dict[str, Any]:
        ls_rows, rows_ = json.loads(json.dumps(ls)), json.loads(json.dumps(attacks))  # fresh copies
        s = {"ls": ls_rows, "attacks": rows_, **judge(ls_rows, rows_, 0.05)}
        return {"students": {"mlp": s}, "verdict": s["verdict"]}

    report: dict[str, Any] = {
        "config": {"epochs": epochs, "seeds": seeds, "alpha": 0.05, "attacks": ["hard_label", "kd", "fm"]},
        "threat_model": {"output_mode": {"kind": "label"}, "epochs": epochs},
        "teacher": {
            "accuracy": 98.1,
            "serving": {"honest_cost": {"accuracy": 98.09, "ece": 1.91, "refused": 0.0, "altered": 0.0}},
        },
        "statement": {"served_as": "labels only", "text": "Served as labels only."},
        "evidence": {"rows": ["tolerated: another section the findings do not read"]},
        "timing": {"task_seconds": task_seconds},
        **section(teacher),
    }
    report["control"] = None if control is None else {"accuracy": 97.8, **section(control)}
    if budgets:
        report["budgets"] = {box: {b: section(a) for b, a in curve.items()} for box, curve in budgets.items()}
        report["safe_budget"] = {box: safe_budget(curve, ["mlp"]) for box, curve in report["budgets"].items()}
    report["verdict"], note = audit_verdict(report["verdict"], control and report["control"]["verdict"])
    report["verdict_reason"] = "mlp: " + report["students"]["mlp"]["reason"] + note
    return report


BELOW = rows(hard_label=[70.0, 71.0, 70.5, 69.5, 70.0], fm=[79.0, 80.0, 79.5, 78.5, 79.0])
COPIED = rows(hard_label=[70.0, 71.0, 70.5, 69.5, 70.0], fm=[84.0, 85.0, 84.5, 83.5, 84.0])
