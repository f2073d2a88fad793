"""The evidence figures of the paper benchmark (`ml.benchmark`): the summary line's evidence fields over
the default protection and the CE control, and the report's evidence table in markdown."""

from __future__ import annotations

from typing import Any

from ml.evidence.registry import DEFAULT_MECHANISM

EVIDENCE_BOXES = ("protected", "control")  # the default protection and the CE control


def evidence_summary(report: dict[str, Any], student: str) -> dict[str, Any]:
    """The default mechanism's TPR over the near-LS knockoffs (unlimited queries) of the default protection
    and the CE control, FPR over the independent LS students, and its cost to honest users (points); the
    false-positive rate per family of the widest null (the LS families and the other architectures, the
    worst over the two boxes) and the TPR near LS against it; the selected challenge's held-out TPR near
    LS, FPR and FPR per family."""
    mechanisms = report.get("evidence", {}).get("mechanisms", {})
    mech = mechanisms.get(DEFAULT_MECHANISM, {})
    found = [mech[b][student] for b in EVIDENCE_BOXES if b in mech and mech[b][student]["null"] is not None]
    if not found:
        fields = ("tpr", "fpr", "cost", "fpr_by_family", "widest_tpr", "selected_tpr", "selected_fpr",
                  "selected_fpr_by_family")  # fmt: skip
        return {f"evidence_{f}": None for f in fields}
    widest = [w for sec in found if (w := sec.get("other_architectures") or {}).get("near_ls_unlimited")]
    near = sum(w["near_ls_unlimited"] for w in widest)  # the near-LS knockoffs tested against the widest null
    selected = [mechanisms.get("selected", {}).get(b, {}).get(student) for b in EVIDENCE_BOXES]
    selected = [s for s in selected if s and s.get("null") is not None]
    alpha = report["evidence"]["alpha"]
    return {
        "evidence_tpr": _near_ls_rate(found, alpha),
        "evidence_fpr": max((sec["fpr"] for sec in found if sec["fpr"] is not None), default=None),
        "evidence_cost": max(sec.get("honest_cost", {}).get("accuracy_lost", 0.0) for sec in found),
        "evidence_fpr_by_family": _worst_by_family([sec.get("other_architectures") or {} for sec in found]),
        "evidence_widest_tpr": sum(w["tpr_near_ls_unlimited"] * w["near_ls_unlimited"] for w in widest) / near
        if near
        else None,
        "evidence_selected_tpr": _near_ls_rate(selected, alpha),
        "evidence_selected_fpr": max((s["fpr"] for s in selected if s["fpr"] is not None), default=None),
        "evidence_selected_fpr_by_family": _worst_by_family(selected),
    }


def _worst_by_family(sections: list[dict[str, Any]]) -> dict[str, float] | None:
    """Each family's false-positive rate, the worst over the sections (`fpr_by_family`); None: none."""
    out: dict[str, float] = {}
    for sec in sections:
        for f, rate in (sec.get("fpr_by_family") or {}).items():
            if rate is not None:
                out[f] = max(rate, out.get(f, 0.0))
    return out or None


def _near_ls_rate(sections: list[dict[str, Any]], alpha: float) -> float | None:
    """The share of near-LS knockoffs (unlimited queries) called copies over these sections."""
    hits = [
        q < alpha
        for sec in sections
        for row in sec["phases"].get("unlimited", {}).values()
        for q, near in zip(row["p"], row["near_ls"], strict=True)
        if near
    ]
    return sum(hits) / len(hits) if hits else None


def evidence_markdown(report: dict[str, Any], student: str) -> list[str]:
    """One row per mechanism x black box: null, FPR, TPR (all, near LS, per attack), median p, cost."""
    ev = report.get("evidence")
    if not ev:
        return []
    lines = [
        "",
        f"Evidence of theft (alpha {ev['alpha']}, {ev['points']} challenge points; TPR over knockoffs with "
        "unlimited queries; near LS: within 1 point of the best LS student or above; FPR: leave-one-out "
        "over the independent LS students; commitment sha256 " + ev["commitment"]["sha256"][:16] + "...).",
        "",
        "| mechanism | black box | null agreement per family (n) | FPR | TPR | TPR near LS (n) | "
        "per attack TPR (median agreement, median p) | honest acc lost / altered % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mech, boxes in ev["mechanisms"].items():
        for box, per_arch in boxes.items():
            if box == "serving" or student not in per_arch or per_arch[student]["null"] is None:
                continue
            sec = per_arch[student]
            rows = sec["phases"].get("unlimited", {})
            per = ", ".join(
                f"{a} {r['detected']:.2f} ({sorted(r['agreement'])[len(r['agreement']) // 2]:.3f}, "
                f"{sorted(r['p'])[len(r['p']) // 2]:.1e})"
                for a, r in rows.items()
            )
            near, cost = sec.get("tpr_near_ls_unlimited"), sec.get("honest_cost")
            null = ", ".join(
                f"{f} {n['mean']:.3f} ± {n['std']:.3f} ({n['n']})" for f, n in sec["null"].items()
            )
            near_s = "-" if near is None else f"{near:.2f}"
            cost_s = "-" if cost is None else f"{cost['accuracy_lost']:.2f} / {cost['altered']:.2f}"
            lines.append(
                f"| {mech} | {box} | {null} | "
                f"{sec['fpr']:.3f} | {sec.get('tpr_unlimited', float('nan')):.2f} | "
                f"{near_s} ({sec.get('near_ls_unlimited', 0)}) | {per} | {cost_s} |"
            )
    return lines
