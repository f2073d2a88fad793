"""The protection statement: what the protection as served stops and what it does not, in plain words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ml.audit.result import AuditReport, Statement
from ml.oracle import OutputMode
from ml.policy import PolicyConfig

# What `cmim bench paper` measured of the enforced black box (ml.enforced_sim), recorded from a run by
# bench/record_enforced.py with its revision and command; absent until a run has measured it.
ENFORCED_MEASURED = Path(__file__).with_name("enforced_measured.json")


def deployed_served_as(deployed: dict[str, Any]) -> str:
    """How a model audited through its endpoint is served: by its deployment, not by cmim."""
    return f"as deployed at {deployed['endpoint']['url']} (its answers as it gave them)"


def protection_statement(report: AuditReport) -> Statement:
    """What the protection as served stops and what it does not, in plain words, from the measurements."""
    served = OutputMode.model_validate(report.threat_model.output_mode).words()
    served = ", ".join([served, *PolicyConfig.model_validate(report.teacher.serving.policy).words()])
    head = f"Served as {served}."
    if report.deployed is not None:  # the endpoint's answers as it gave them: cmim serves nothing
        served = deployed_served_as(report.deployed)
        head = f"{report.deployed['text']} Served {served}."
    stops, leaks = [], []
    for arch, s in report.students.items():
        for name, row in s.attacks.items():
            if row.margin is None or row.margin <= 0:
                stops.append(f"{name} ({arch})")
            else:
                sig = "significant after Holm" if row.significant_holm else "within noise"
                leaks.append(f"{name} ({arch}): {row.margin:+.2f} ± {row.margin_se:.2f}, {sig}")
    queries = max((r.queries for s in report.students.values() for r in s.attacks.values()), default=0)
    lines = [
        f"{head} Against attackers querying throughout their training ({queries:,} queries "
        "each at most), "
        + (
            "no knockoff beat the best label-smoothing student."
            if not leaks
            else f"{len(leaks)} of {len(stops) + len(leaks)} knockoffs beat the best label-smoothing "
            "student on average: " + "; ".join(leaks) + "."
        )
    ]
    low = report.served_safe_budget()
    # cmim enforces the budget of a model it serves; a deployment elsewhere enforces its own
    budget = (
        "the per-key budget to enforce at your deployment"
        if report.deployed
        else "the served model's default per-key budget"
    )
    if low is not None:
        lines.append(
            f"With at most {low:,} queries per key (the safe budget, {budget}) no knockoff beat it. A "
            "budget per key holds only as far as keys are controlled: an "
            f"attacker with n keys holds n x {low:,} queries."
            if low
            else "No tested query budget was safe: a knockoff beat label smoothing at the smallest one."
        )
    enforced = enforcement_statement()
    lines.append(enforced)
    return Statement(
        served_as=served, stops=stops, does_not_stop=leaks, enforcement=enforced, text=" ".join(lines)
    )


def enforcement_statement(path: Path = ENFORCED_MEASURED) -> str:
    """What the default enforcement policy adds, as the benchmark measured it (or that it has not)."""
    if not path.exists():
        return (
            "What the default enforcement policy adds against a thief holding many keys is not yet measured "
            "(cmim bench paper, the enforced black box)."
        )
    m = json.loads(path.read_text())
    where = (
        f"({m['benchmark']}, {m['seeds']} seeds, revision {m['revision']}"
        + (", indicative: a small configuration" if m.get("indicative") else "")
        + f"; `{m['command']}`)"
    )
    keys, margin, se = m["keys"], m["enforced_margin"], m["enforced_margin_se"]
    honest = f"{m['honest_suspended']} honest keys suspended, {m['honest_limited']:.2f} % throttled or on "
    honest += "probation"
    if margin <= 0:
        return (
            f"With the default enforcement policy, the benchmark's attackers holding up to {keys} keys, "
            f"those that know the monitor included, stayed below the LS student (largest margin "
            f"{margin:+.2f} ± {se:.2f}; {honest}) {where}."
        )
    how = "significantly after Holm" if m["significant_holm"] else "not significantly after Holm"
    return (
        f"With the default enforcement policy, the benchmark's attackers holding up to {keys} keys did not "
        f"all stay below the LS student: {m['worst']} came {margin:+.2f} ± {se:.2f} points above it, {how} "
        f"({honest}) {where}."
    )
