"""The selected challenge's report section (`ml.evidence.selected`): chosen on the students of even seeds,
measured on those of odd seeds, and said in words: whether evidence can work for this model, and why not.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ml.evidence.nulls import uncovered
from ml.evidence.registry import DEFAULT_MECHANISM
from ml.evidence.selected import KINDS, MIN_POINTS, pool_kinds, select
from ml.evidence.stats import ALPHA, MIN_FAMILY, Null, fpr_by_family, members, rates

TARGET_TPR = 0.9  # the detection rate near LS a working evidence should reach (docs/evidence.md)
CANNOT = "Evidence for this model cannot work: "
SPLIT = "chosen on the students of seeds 0, 2, 4, ...; measured on those of seeds 1, 3, 5, ..."

Bits = list[np.ndarray]  # one per seed, in seed order


def selected_section(
    negatives: dict[str, list[Bits]], families: dict[str, str], knockoffs: dict[tuple[str, str], Bits],
    near: dict[tuple[str, str], list[bool]], points: int,
) -> dict[str, Any]:  # fmt: skip
    """The section of one black box and student architecture. `negatives`: per recipe of independent
    models (an LS row, a null family), per seed, their agreement bits on the pool, `families` each
    recipe's family (the choice avoids every recipe, the test takes the families); `knockoffs[(phase,
    row)]` one per seed, with `near` their near-LS flags per seed (chosen on phase "unlimited")."""
    pool = len(next(b for v in negatives.values() for per_seed in v for b in per_seed))
    kinds = pool_kinds(pool)
    out: dict[str, Any] = {"pool": pool, "pool_kinds": dict(Counter(kinds)), "split": SPLIT, "null": None}
    pick = {r: [b for per_seed in v[0::2] for b in per_seed] for r, v in negatives.items()}
    chosen = [b for (ph, _), v in knockoffs.items() if ph == "unlimited" for b in v[0::2]]
    held: dict[str, list[np.ndarray]] = {}
    for r, v in negatives.items():
        held.setdefault(families[r], []).extend(b for per_seed in v[1::2] for b in per_seed)
    held = {f: v for f, v in held.items() if v}
    if not held or not chosen:
        return out | _fails("the audit has one seed: the challenge is chosen on one half of the seeds and "
                            "measured on the other, so it needs at least 2")  # fmt: skip
    kept, score = select(chosen, pick, points)
    out |= {"selected_points": len(kept), "kinds_kept": {k: sum(kinds[i] == k for i in kept) for k in KINDS},
            "challenge": kept.tolist()}  # fmt: skip
    if len(kept) < MIN_POINTS:
        return out | _fails(
            f"on only {len(kept)} of {pool} candidate inputs (mixes, perturbations, boundary points) do the "
            "knockoffs give the teacher's answer more often than every kind of independent model does: the "
            "teacher answers what any model trained on this data answers"
        )
    m = len(kept)
    agree = lambda b: float(b[kept].mean())  # noqa: E731
    by_family = {f: [agree(b) for b in v] for f, v in held.items()}
    try:  # families of fewer than MIN_FAMILY are tested (fpr_by_family), not part of the null
        null = Null.fit(members(by_family), m)
    except ValueError:
        return out | _fails(
            f"the held-out half has no family of {MIN_FAMILY} independent models: more seeds are needed"
        )
    fpr, per_family = fpr_by_family(by_family, m, MIN_FAMILY)
    phases: dict[str, Any] = {}
    for (ph, row), v in knockoffs.items():
        a = [agree(b) for b in v[1::2]]
        p = [null.p_value(x) for x in a]
        detected = float(np.mean([q < ALPHA for q in p]))
        phases.setdefault(ph, {})[row] = {
            "agreement": a,
            "p": p,
            "detected": detected,
            "near_ls": near[(ph, row)][1::2],
        }
    teacher_p = null.p_value(1.0)
    teacher = {"agreement": 1.0, "p": teacher_p, "verdict": "copy" if teacher_p < ALPHA else "not_shown"}
    out |= {
        "null": null.to_json(), "negatives": by_family, "fpr": fpr, "fpr_by_family": per_family,
        "threshold": null.threshold(),
        "teacher": teacher,
        **{f"{k}_{ph}": v for ph, rows in phases.items() for k, v in rates(rows).items()},
        "phases": phases,
    }  # fmt: skip
    return out | _judge(out, by_family)


def _fails(reason: str) -> dict[str, Any]:
    return {
        "works": False,
        "meets_target": False,
        "reason": CANNOT + reason + ".",
    }


def _judge(sec: dict[str, Any], by_family: dict[str, list[float]]) -> dict[str, Any]:
    """works: the teacher's answers are called a copy, some held-out knockoff is, no more than alpha of the
    held-out independent models are; meets_target: besides, TPR near LS >= TARGET_TPR."""
    near_n, tpr = sec.get("near_ls_unlimited", 0), sec.get("tpr_near_ls_unlimited")
    rows = sec["phases"].get("unlimited", {})
    knock = [a for r in rows.values() for a in r["agreement"]]
    indep = [a for v in by_family.values() for a in v]
    median = np.median(knock) if knock else float("nan")
    seen = (
        f"on the held-out students independent models agree with the teacher on {np.mean(indep):.0%} of the "
        f"chosen challenge ({sec['selected_points']} points), knockoffs on a median {median:.0%}"
    )
    if sec["teacher"]["verdict"] != "copy":
        why = f"the teacher's own answers are not called a copy (p = {sec['teacher']['p']:.2g}): {seen}"
    elif sec["fpr"] is None or sec["fpr"] > ALPHA:
        why = f"held-out independent models are called copies (false-positive rate {sec['fpr']}): {seen}"
    elif not sec.get("tpr_unlimited"):
        why = f"no held-out knockoff is called a copy: {seen}"
    else:
        called = ", ".join(f"{row} {r['detected']:.0%}" for row, r in rows.items())
        near = f"{tpr:.0%} of the {near_n} near the LS student" if near_n else "none came near the LS student"
        meets = bool(near_n) and tpr is not None and tpr >= TARGET_TPR
        reason = (f"Evidence works for this model: {seen}; the teacher's own answers are called a copy "
                  f"(p = {sec['teacher']['p']:.2g}), held-out knockoffs are ({called}; {near}), and "
                  f"{sec['fpr']:.0%} of {len(indep)} independent models ({', '.join(by_family)}); this "
                  f"{'meets' if meets else 'misses'} the target of {TARGET_TPR:.0%} near LS at a "
                  f"false-positive rate of {ALPHA:.0%}.")  # fmt: skip
        return {"works": True, "meets_target": meets, "reason": reason}
    return _fails(why)


def fingerprint_test(evidence: dict[str, Any] | None, box: str = "teacher") -> dict[str, Any] | None:
    """The default mechanism's test of the served teacher (its first student architecture) as verify
    applies it: against the widest null where the audit trained other architectures. None: no test."""
    per_arch = ((evidence or {}).get("mechanisms", {}).get(DEFAULT_MECHANISM) or {}).get(box) or {}
    sec = next(iter(per_arch.values()), None)
    return None if sec is None else sec.get("other_architectures") or sec


def works(test: dict[str, Any] | None) -> bool:
    """A mechanism's test works: no more than alpha of the independent models called copies (measured),
    and some knockoff with unlimited queries called one."""
    if test is None or test.get("fpr") is None:
        return False
    return test["fpr"] <= ALPHA and bool(test.get("tpr_unlimited"))


def evidence_words(evidence: dict[str, Any] | None) -> str | None:
    """What the report tells its owner of evidence: the selected challenge's reason for the served
    teacher (the first student architecture), or, when it cannot work but the fingerprint does, that the
    fingerprint works; and the architectures the null does not cover; None when the audit measured no
    evidence."""
    per_arch = ((evidence or {}).get("mechanisms", {}).get("selected") or {}).get("teacher") or {}
    reason = next((sec["reason"] for sec in per_arch.values()), None)
    fp = fingerprint_test(evidence)
    if reason is not None and reason.startswith(CANNOT) and works(fp):
        assert fp is not None
        reason = (
            f"Evidence works for this model with the fingerprint: it calls {fp['tpr_unlimited']:.0%} of the "
            f"audit's knockoffs (unlimited queries) copies and {fp['fpr']:.0%} of its independent models. A "
            "challenge chosen on the audit's students could not be: " + reason[len(CANNOT) :]
        )
    words = [reason, uncovered(evidence)]
    return " ".join(w for w in words if w) or None
