"""The verdict: best LS row against every attack, Holm-adjusted over a black box's rows; safe budgets.

Per student architecture, every attack row is compared with the best LS student (margin, paired
standard error, one-sided Welch p-value). The p-values of all attack rows of one black box (every
student, every attack) are adjusted together with Holm's step-down method, and each row gets an
outcome:

- `copied`: its mean is above the best LS mean and the gain stays significant after Holm;
- `within_noise`: its mean is above the best LS mean, but not significantly so after Holm;
- `not_copied`: its mean is at or below the best LS mean.

A student's verdict is `distillable` when some row is `copied`, `undistillable` when every row is
`not_copied` (and at least two seeds were run), `inconclusive` otherwise. Whether the audit could
have told the two apart (a CE control found distillable) is decided where the report is assembled.
"""

from __future__ import annotations

from typing import Any

from ml.audit.stats import holm, summarise, welch_one_sided

OUTCOMES = ("copied", "within_noise", "not_copied")


def compare(ls: dict[str, dict[str, Any]], attacks: dict[str, dict[str, Any]]) -> str:
    """Margin, its paired standard error and the one-sided Welch p-value of every attack row against the
    best LS row (written into the rows); returns the best LS row's name."""
    best_ls = max(ls, key=lambda k: ls[k]["acc_best"]["mean"])
    ls_vals = ls[best_ls]["acc_best"]["values"]
    for row in attacks.values():
        vals = row["acc_best"]["values"]
        row["margin"] = row["acc_best"]["mean"] - ls[best_ls]["acc_best"]["mean"]
        row["margin_se"] = summarise([a - b for a, b in zip(vals, ls_vals, strict=True)])["se"]
        row["p_value"] = welch_one_sided(vals, ls_vals)
    return best_ls


def outcome(row: dict[str, Any]) -> str:
    """`copied`, `within_noise` or `not_copied`: the row against the best LS student, after Holm."""
    if row["margin"] <= 0:
        return "not_copied"
    return "copied" if row.get("significant_holm") else "within_noise"


def judge_black_box(
    students: dict[str, tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]], alpha: float
) -> dict[str, dict[str, Any]]:
    """Per student architecture, `(ls rows, attack rows)` -> its verdict; Holm over every attack row of
    the black box. The rows get margin, margin_se, p_value, significant (unadjusted), p_holm,
    significant_holm and outcome."""
    best = {arch: compare(ls, attacks) for arch, (ls, attacks) in students.items()}
    family = [row for _, attacks in students.values() for row in attacks.values()]
    for row, p in zip(family, holm([r["p_value"] for r in family]), strict=True):
        row["significant"] = bool(row["p_value"] < alpha)
        row["p_holm"] = p
        row["significant_holm"] = bool(p < alpha)
        row["outcome"] = outcome(row)
    return {arch: _decide(ls, attacks, best[arch], len(family)) for arch, (ls, attacks) in students.items()}


def judge(ls: dict[str, dict[str, Any]], attacks: dict[str, dict[str, Any]], alpha: float) -> dict[str, Any]:
    """One student architecture alone: Holm over its own attack rows."""
    return judge_black_box({"": (ls, attacks)}, alpha)[""]


def _decide(
    ls: dict[str, dict[str, Any]], attacks: dict[str, dict[str, Any]], best_ls: str, family: int
) -> dict[str, Any]:
    n = len(ls[best_ls]["acc_best"]["values"])
    best_attack = max(attacks, key=lambda k: attacks[k]["acc_best"]["mean"])
    b = attacks[best_attack]
    copied = sorted(
        (k for k, r in attacks.items() if r["outcome"] == "copied"), key=lambda k: attacks[k]["p_holm"]
    )
    ahead = [k for k, r in attacks.items() if r["outcome"] == "within_noise"]
    over = f"Holm-adjusted over {family} attack row{'s' if family != 1 else ''}"
    if n < 2:
        verdict, reason = "inconclusive", f"{n} seed: too few for a test"
    elif copied:
        c = attacks[copied[0]]
        verdict, reason = (
            "distillable",
            f"{copied[0]} beats the best LS student by {c['margin']:.2f} (p={c['p_value']:.3g}; "
            f"{over} p={c['p_holm']:.3g})",
        )
    elif ahead:
        verdict, reason = (
            "inconclusive",
            f"{best_attack} is ahead by {b['margin']:.2f}, not significant (p={b['p_value']:.3g}; "
            f"{over} p={b['p_holm']:.3g})",
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
        "copied_by": copied,
        "margin_last": max(a["acc_last"]["mean"] for a in attacks.values()) - last_ls,
        "verdict": verdict,
        "reason": reason,
    }


def combine_verdicts(verdicts: list[str]) -> str:
    if "distillable" in verdicts:
        return "distillable"
    return "undistillable" if all(v == "undistillable" for v in verdicts) else "inconclusive"


def audit_verdict(teacher: str, control: str | None) -> tuple[str, str]:
    """The report's verdict from the teacher's and the CE control's (None: no control was run), and
    what it adds to the reason: `undistillable` needs a control found distillable."""
    if control is None:
        note = "; no CE control was run, so the audit's power to discriminate is unchecked"
        if (
            teacher == "undistillable"
        ):  # without a control the audit cannot show it would catch a copyable teacher
            return "inconclusive", note + ", and the verdict cannot be undistillable"
        return teacher, note
    if teacher == "undistillable" and control != "distillable":
        return (
            "inconclusive",
            "; the CE control is not found distillable either, so this audit cannot discriminate",
        )
    return teacher, ""


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
