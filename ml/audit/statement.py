"""The protection statement: what the protection as served stops and what it does not, in plain words."""

from __future__ import annotations

from typing import Any

from ml.oracle import OutputMode


def protection_statement(report: dict[str, Any]) -> dict[str, Any]:
    """What the protection as served stops and what it does not, in plain words, from the measurements."""
    served = OutputMode.model_validate(report["threat_model"]["output_mode"]).words()
    policy = report["teacher"]["serving"]["policy"]
    if policy.get("snap"):
        served += ", snapped to class centroids"
    if policy.get("detector", "none") != "none":
        served += f", {policy['detector']} detector -> {policy['action']}"
    stops, leaks = [], []
    for arch, s in report["students"].items():
        for name, row in s["attacks"].items():
            if row["margin"] <= 0:
                stops.append(f"{name} ({arch})")
            else:
                sig = "significant after Holm" if row.get("significant_holm") else "within noise"
                leaks.append(f"{name} ({arch}): {row['margin']:+.2f} ± {row['margin_se']:.2f}, {sig}")
    queries = max(
        (r["queries"] for s in report["students"].values() for r in s["attacks"].values()), default=0
    )
    lines = [
        f"Served as {served}. Against attackers querying throughout their training ({queries:,} queries "
        "each at most), "
        + (
            "no knockoff beat the best label-smoothing student."
            if not leaks
            else f"{len(leaks)} of {len(stops) + len(leaks)} knockoffs beat the best label-smoothing "
            "student on average: " + "; ".join(leaks) + "."
        )
    ]
    safe = report.get("safe_budget", {}).get("teacher")
    if safe:
        low = min(safe.values())
        lines.append(
            f"With at most {low:,} queries per key (the safe budget, the served model's default per-key "
            "budget) no knockoff beat it. A budget per key holds only as far as keys are controlled: an "
            f"attacker with n keys holds n x {low:,} queries."
            if low
            else "No tested query budget was safe: a knockoff beat label smoothing at the smallest one."
        )
    return {"served_as": served, "stops": stops, "does_not_stop": leaks, "text": " ".join(lines)}
