"""Evidence measured by the audit: every student's agreement on every challenge, and the section of the
report that turns them into detection rates (knockoffs) and false-positive rates (LS students).

The audit trains both populations an evidence test needs: knockoffs of every attack (positives) and
independent LS students of the same data and architecture (negatives). Duck-typed on the audit's
black boxes and runs, so ml.audit imports this module and not the other way round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from ml.data import Dataset
from ml.evidence.base import Challenge
from ml.evidence.heldout import selected_section
from ml.evidence.nulls import is_null_row
from ml.evidence.registry import CHALLENGE_POINTS, MECHANISMS
from ml.evidence.secret import Secret
from ml.evidence.selected import pack_bits, pool_size, unpack_bits
from ml.evidence.stats import ALPHA, MIN_FAMILY, NEAR_LS_POINTS, Null, fpr_by_family, loo_fpr, members, rates

Challenges = dict[str, dict[str, list[Challenge]]]  # mechanism -> black box -> one per seed


def build_challenges(boxes: dict[str, Any], data: Dataset, secret: Secret, seeds: int) -> Challenges:
    """Each mechanism's challenge for each black box and seed (boxes serving one model the same way share)."""
    out: Challenges = {}
    for name, mech in MECHANISMS.items():
        cache: dict[tuple[int, int], Challenge | None] = {}
        for box_name, box in boxes.items():
            per_seed = []
            for s in range(seeds):
                model = box.models[s % len(box.models)]
                policy = box.policies[s % len(box.policies)] if box.policies else None
                key = (id(model), id(policy) if mech.serving else 0)
                if key not in cache:
                    cache[key] = mech.challenge(model, policy, data, secret, CHALLENGE_POINTS)
                per_seed.append(cache[key])
            if all(c is not None for c in per_seed):
                out.setdefault(name, {})[box_name] = per_seed
    return out


def evidence_records(
    runs: Sequence[Any], predict: Callable[[Tensor], Tensor], challenges: Challenges, seed_index: int,
    phase: int | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """{phase, teacher (None: an independent model), arch, row, mechanism, black box, agreement; for a
    selecting mechanism the agreement on every candidate} for every trained run: one batched forward of
    all runs per distinct challenge; independent runs are negatives for every box."""
    records: list[dict[str, Any]] = []
    preds: dict[int, Tensor] = {}
    for mech, per_box in challenges.items():
        selects = getattr(MECHANISMS.get(mech), "selects", False)
        for box, per_seed in per_box.items():
            ch = per_seed[seed_index]
            if id(ch) not in preds:
                preds[id(ch)] = predict(ch.x)
            for r, p in zip(runs, preds[id(ch)], strict=True):
                if r.teacher is None or r.teacher == box:
                    bits = pack_bits(p.cpu() == ch.labels.cpu()) if selects else None
                    records.append({"phase": phase, "teacher": r.teacher, "arch": r.arch, "row": r.name,
                                    "mechanism": mech, "box": box, "agreement": ch.agreement(p),
                                    "agrees": bits})  # fmt: skip
    return records


# Stated in every report beside the figures (docs/evidence.md says more).
EVIDENCE_LIMITS = (
    "What the evidence can show: that a suspect agrees with this model on the secret challenge far more "
    "than independently trained models do, as a model trained to match this model's answers does (the "
    "function-matching attacks). What it cannot show: a copy made only from this model's labels on clean "
    'inputs looks like an independent model, so "not shown" is no proof of innocence; a thief who '
    "fine-tunes a copy on other data was not measured; the false-positive bound holds for suspects like the "
    "audit's independent students (same data, same architecture)."
)


def evidence_section(
    records: list[tuple[Any, ...]],
    accuracy: dict[tuple[Any, ...], list[float]],
    costs: dict[str, dict[str, float]],
    commitment: dict[str, str],
) -> dict[str, Any]:
    """The report's evidence section. `records` are `EvidenceRecord.as_tuple()`s; `accuracy[(phase,
    teacher, arch, row)]` are best accuracies per seed (seed order, as the records); `costs` the honest
    cost of each keyed black box; `commitment` the evidence secret's (`Secret.commitment`)."""
    agree: dict[tuple[Any, ...], list[float]] = {}
    bits: dict[tuple[Any, ...], list[np.ndarray]] = {}
    for phase, teacher, arch, row, mech, box, a, hexed in records:  # records come in seed order
        agree.setdefault((mech, box, arch, phase, teacher, row), []).append(a)
        if hexed is not None:
            pool = pool_size(CHALLENGE_POINTS)
            bits.setdefault((mech, box, arch, phase, teacher, row), []).append(unpack_bits(hexed, pool))
    out: dict[str, Any] = {
        "commitment": commitment,
        "alpha": ALPHA,
        "points": CHALLENGE_POINTS,
        "near_ls_points": NEAR_LS_POINTS,
        "limits": EVIDENCE_LIMITS,
        "mechanisms": {},
    }
    for mech, box, arch in dict.fromkeys((k[0], k[1], k[2]) for k in agree if not is_null_row(k[5])):
        negatives = {k[5]: v for k, v in agree.items() if k[:3] == (mech, box, arch) and k[4] is None}
        others: dict[str, list[float]] = {}  # per null family, every model of every seed
        for k, v in agree.items():
            if k[:2] == (mech, box) and is_null_row(k[5]):
                others.setdefault(k[2], []).extend(v)
        by_family: dict[str, list[float]] = {}
        for row, values in negatives.items():
            by_family.setdefault(family(row), []).extend(values)
        ls = {row: accuracy[(None, None, arch, row)] for row in negatives}
        best_ls = ls[max(ls, key=lambda r: np.mean(ls[r]))]
        if getattr(MECHANISMS.get(mech), "selects", False):
            summary = _selected(bits, (mech, box, arch), accuracy, best_ls)
            out["mechanisms"].setdefault(mech, {"serving": MECHANISMS.get(mech).serving})
            out["mechanisms"][mech].setdefault(box, {})[arch] = summary
            continue
        fpr = loo_fpr(by_family, CHALLENGE_POINTS)
        if fpr is None:  # no test without a null: say so instead
            reason = "no family of 3 independent (LS) students: no test"
            summary: dict[str, Any] = {"null": None, "negatives": by_family, "fpr": None, "reason": reason}
        else:
            null = Null.fit(by_family, CHALLENGE_POINTS)
            summary = _tested(agree, (mech, box, arch), null, accuracy, best_ls)
            summary |= {"negatives": by_family, "fpr": fpr}
            if others:
                summary["other_architectures"] = _widest(agree, (mech, box, arch), by_family | others,
                                                         accuracy, best_ls)  # fmt: skip
        if box in costs:
            summary["honest_cost"] = costs[box]
        out["mechanisms"].setdefault(mech, {"serving": MECHANISMS.get(mech).serving})
        out["mechanisms"][mech].setdefault(box, {})[arch] = summary
    return out


def _widest(
    agree: dict[tuple[Any, ...], list[float]], which: tuple[str, str, str], by_family: dict[str, list[float]],
    accuracy: dict[tuple[Any, ...], list[float]], best_ls: list[float],
) -> dict[str, Any]:  # fmt: skip
    """The test against the widest null (the LS families and the other architectures'): the
    false-positive rate per family (leave-one-out) and the detection rates with unlimited queries."""
    min_n = MIN_FAMILY if members(by_family) else 2  # a small audit: its families of 2 are all it has
    fpr, per_family = fpr_by_family(by_family, CHALLENGE_POINTS, min_n)
    null = Null.fit(members(by_family, min_n), CHALLENGE_POINTS)
    tested = _tested(agree, which, null, accuracy, best_ls)
    keep = ("tpr_unlimited", "tpr_near_ls_unlimited", "near_ls_unlimited")
    return {"negatives": by_family, "null": null.to_json(), "threshold": null.threshold(), "fpr": fpr,
            "fpr_by_family": per_family, **{k: tested[k] for k in keep if k in tested}}  # fmt: skip


def _selected(
    bits: dict[tuple[Any, ...], list[np.ndarray]], which: tuple[str, str, str],
    accuracy: dict[tuple[Any, ...], list[float]], best_ls: list[float],
) -> dict[str, Any]:  # fmt: skip
    """A selecting mechanism's section (`ml.evidence.heldout`): every independent model (LS families and
    other architectures) and knockoff of this box and architecture by its per-seed agreement bits."""
    mech, box, arch = which
    negatives: dict[str, list[list[np.ndarray]]] = {}  # per recipe (an LS row, a null family), per seed
    families: dict[str, str] = {}
    knockoffs: dict[tuple[str, str], list[np.ndarray]] = {}
    near: dict[tuple[str, str], list[bool]] = {}
    for (m, b, a, phase, teacher, row), v in bits.items():
        if (m, b) != (mech, box):
            continue
        if is_null_row(row):  # a family's models of one seed together (null_models of them)
            per_seed = negatives.setdefault(a, [[] for _ in v])
            for models, b in zip(per_seed, v, strict=True):
                models.append(b)
            families[a] = a
        elif a == arch and teacher is None:
            negatives[row], families[row] = [[b] for b in v], family(row)
        elif a == arch:
            key = ("unlimited" if phase is None else str(phase), row)
            knockoffs[key] = v
            acc = accuracy[(phase, teacher, arch, row)]
            near[key] = [x >= ls_x - NEAR_LS_POINTS for x, ls_x in zip(acc, best_ls, strict=True)]
    return selected_section(negatives, families, knockoffs, near, CHALLENGE_POINTS)


def _tested(
    agree: dict[tuple[Any, ...], list[float]],
    which: tuple[str, str, str],
    null: Null,
    accuracy: dict[tuple[Any, ...], list[float]],
    best_ls: list[float],
) -> dict[str, Any]:
    """Per knockoff row and phase: agreements, p-values, detected share, near-LS flags; and the rates."""
    phases: dict[str, Any] = {}
    for (m, b, arch, phase, teacher, row), values in agree.items():
        if (m, b, arch) != which or teacher is None:
            continue
        acc = accuracy[(phase, teacher, arch, row)]
        p = [null.p_value(a) for a in values]
        near = [a >= ls_a - NEAR_LS_POINTS for a, ls_a in zip(acc, best_ls, strict=True)]
        detected = float(np.mean([q < ALPHA for q in p]))
        key = "unlimited" if phase is None else str(phase)
        phases.setdefault(key, {})[row] = {"agreement": values, "p": p, "detected": detected, "near_ls": near}
    return {
        "null": null.to_json(),
        "threshold": null.threshold(),
        **{f"{k}_{ph}": v for ph, rows in phases.items() for k, v in rates(rows).items()},
        "phases": phases,
    }


def family(ls_row: str) -> str:
    """The training recipe of an LS row (`ml.audit.config.ls_recipes` names them ls_<eps>, ls_mixup_<eps>)."""
    return "mixup" if ls_row.startswith("ls_mixup") else "plain"


def keyed_costs(boxes: dict[str, Any], data: Dataset) -> dict[str, dict[str, float]]:
    """For black boxes with keyed answers: honest cost with them and without (second half of the test
    split, as the serving summary), means over the per-seed teachers."""
    from ml.policy import honest_cost  # ml.policy imports ml.evidence

    half = len(data.x_test) // 2
    x, y = data.x_test[half:], data.y_test[half:]
    out = {}
    for name, box in boxes.items():
        if not box.policies or box.policies[0].keyed is None:
            continue
        with_k, without = [], []
        for i, m in enumerate(box.models):
            pol = box.policies[i % len(box.policies)]
            with_k.append(honest_cost(m, box.mode, pol, x, y))
            without.append(honest_cost(m, box.mode, dataclasses.replace(pol, keyed=None), x, y))
        mean = lambda cs, k: float(np.mean([c[k] for c in cs]))  # noqa: E731
        out[name] = {
            "accuracy": mean(with_k, "accuracy"),
            "accuracy_lost": mean(without, "accuracy") - mean(with_k, "accuracy"),
            "ece": mean(with_k, "ece"),
            "altered": mean(with_k, "altered") - mean(without, "altered"),
        }
    return out
