"""The verdict: best LS row against every attack (SPEC.md's rule), combined verdicts, safe budgets."""

from __future__ import annotations

from typing import Any

from ml.audit.stats import holm, summarise, welch_one_sided


def judge(ls: dict[str, dict[str, Any]], attacks: dict[str, dict[str, Any]], alpha: float) -> dict[str, Any]:
    """Best LS row, per-attack margins and tests, and this student's verdict (SPEC.md's rule)."""
    best_ls = max(ls, key=lambda k: ls[k]["acc_best"]["mean"])
    ls_vals = ls[best_ls]["acc_best"]["values"]
    for row in attacks.values():
        vals = row["acc_best"]["values"]
        row["margin"] = row["acc_best"]["mean"] - ls[best_ls]["acc_best"]["mean"]
        row["margin_se"] = summarise([a - b for a, b in zip(vals, ls_vals, strict=True)])["se"]
        row["p_value"] = welch_one_sided(vals, ls_vals)
        row["significant"] = bool(row["p_value"] < alpha)
    # the verdict tests the best of many attacks: Holm's adjustment says what survives the multiplicity
    for row, p in zip(attacks.values(), holm([r["p_value"] for r in attacks.values()]), strict=True):
        row["p_holm"] = p
        row["significant_holm"] = bool(p < alpha)
    best_attack = max(attacks, key=lambda k: attacks[k]["acc_best"]["mean"])
    b = attacks[best_attack]
    n = len(ls_vals)
    if n < 2:
        verdict, reason = "inconclusive", f"{n} seed: too few for a test"
    elif b["margin"] > 0 and b["significant"]:
        verdict, reason = (
            "distillable",
            f"{best_attack} beats the best LS student by {b['margin']:.2f} (p={b['p_value']:.3g}; "
            f"Holm-adjusted over {len(attacks)} attacks p={b['p_holm']:.3g})",
        )
    elif b["margin"] > 0:
        verdict, reason = (
            "inconclusive",
            f"{best_attack} is ahead by {b['margin']:.2f}, not significant (p={b['p_value']:.3g})",
        )
    else:
        verdict, reason = "undistillable", f"no attack beats the best LS student ({best_ls})"
    last_ls = max(ls[k]["acc_last"]["mean"] for k in ls)
    return {
        "best_ls": best_ls,
        "ls_acc": ls[best_ls]["acc_best"]["mean"],
        "best_attack": best_attack,
        "margin": b["margin"],
        "margin_se": b["margin_se"],
        "p_value": b["p_value"],
        "p_holm": b["p_holm"],
        "margin_last": max(a["acc_last"]["mean"] for a in attacks.values()) - last_ls,
        "verdict": verdict,
        "reason": reason,
    }


def combine_verdicts(verdicts: list[str]) -> str:
    if "distillable" in verdicts:
        return "distillable"
    return "undistillable" if all(v == "undistillable" for v in verdicts) else "inconclusive"


def safe_budget(by_budget: dict[str, dict[str, Any]], students: list[str]) -> dict[str, int]:
    """Per student: the largest tested budget at or below which no knockoff's mean beats the best LS mean."""
    out = {}
    for arch in students:
        safe = 0
        for b in sorted(by_budget, key=int):
            if by_budget[b]["students"][arch]["margin"] > 0:
                break
            safe = int(b)
        out[arch] = safe
    return out
