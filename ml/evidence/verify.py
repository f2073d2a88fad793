"""Verification of a suspect against what a job stored: its challenge (inputs and the copy's labels,
server-side), the null of independent models (from the audit report) and the commitment."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ml.cmi import model_logits
from ml.evidence.base import Challenge
from ml.evidence.heldout import fingerprint_test, works
from ml.evidence.nulls import uncovered
from ml.evidence.registry import DEFAULT_MECHANISM
from ml.evidence.stats import ALPHA, MIN_FAMILY, Null, members

MAX_POINTS = 4096  # bound on a stored challenge read back (a job stores CHALLENGE_POINTS)


def store_names(job_id: str) -> tuple[str, str]:
    """Names of a job's server-side evidence objects in the artifact store: (secret, challenge)."""
    return f"evidence/{job_id}/secret.json", f"evidence/{job_id}/challenge.npz"


def selected_names(job_id: str) -> tuple[str, str]:
    """Names of a job's selected-challenge objects: (the candidate pool, drawn from the secret at audit
    start; the kept points with the teacher's labels, written when the job is published)."""
    return f"evidence/{job_id}/pool.npz", f"evidence/{job_id}/selected.npz"


def chosen_section(report: dict[str, Any], box: str = "teacher") -> dict[str, Any] | None:
    """The selected challenge's section (the served teacher's first student architecture, as the report's
    words) when verify uses it: the report says it works, and the fingerprint, tested as verify tests it
    (its widest null, `fingerprint_test`), does not work or detects no more knockoffs (`tpr_unlimited`).
    None: verify uses the fingerprint."""
    mechs = report.get("evidence", {}).get("mechanisms", {})
    sec = next(iter(((mechs.get("selected") or {}).get(box) or {}).values()), None)
    if sec is None or not sec.get("works"):
        return None
    fp = fingerprint_test(report.get("evidence"), box)
    if fp is not None and works(fp) and fp["tpr_unlimited"] > sec["tpr_unlimited"]:
        return None
    return sec


def selected_challenge(report: dict[str, Any], pool: Challenge) -> Challenge | None:
    """The kept candidates of the pool and the teacher's labels on them, when verify uses them."""
    sec = chosen_section(report)
    if sec is None:
        return None
    kept = torch.tensor(sec["challenge"], dtype=torch.long)
    return Challenge(pool.x[kept].contiguous(), pool.labels[kept].contiguous())


def mechanism_null(report: dict[str, Any], mechanism: str) -> tuple[dict[str, list[float]], Null, float]:
    """(each family's agreements, the fitted null, its measured false-positive rate) verify tests against:
    for the selected challenge the held-out independent models' agreements on it (seeds 1, 3, ...), else
    the widest null (`null_from_report`). ValueError: the audit gives no null."""
    if mechanism == DEFAULT_MECHANISM:
        null, fpr = null_from_report(report, mechanism)
        return null_families(report, mechanism), null, fpr
    sec = chosen_section(report)
    if sec is None:
        raise ValueError("the report says the selected challenge does not work")
    families = members(sec["negatives"])
    return families, Null.fit(families, sec["selected_points"]), float(sec["fpr"])


def pack_challenge(ch: Challenge) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=ch.x.numpy().astype(np.float32), labels=ch.labels.numpy().astype(np.int64))
    return buf.getvalue()


def unpack_challenge(raw: bytes) -> Challenge:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        x, labels = z["x"], z["labels"]
    if len(x) != len(labels) or not 0 < len(x) <= MAX_POINTS:
        raise ValueError(f"a stored challenge has {len(x)} inputs and {len(labels)} labels")
    return Challenge(torch.from_numpy(x), torch.from_numpy(labels))


def null_families(report: dict[str, Any], mechanism: str, box: str = "teacher") -> dict[str, list[float]]:
    """The widest null's agreements per family: the audit's LS students (each family pooled over student
    architectures) and its independent models of other architectures (`other_architectures`; a family of
    fewer than MIN_FAMILY is left out: the report gives its false-positive rate against this null)."""
    per_arch = report["evidence"]["mechanisms"][mechanism][box]
    by_family: dict[str, list[float]] = {}
    others: dict[str, list[float]] = {}
    for sec in per_arch.values():
        for f, values in sec["negatives"].items():
            by_family.setdefault(f, []).extend(values)
        for f, values in (sec.get("other_architectures") or {}).get("negatives", {}).items():
            # the same models in every architecture's section; a family of 2 would leave no test
            if f not in sec["negatives"] and len(values) >= MIN_FAMILY:
                others[f] = values
    return by_family | others


def null_from_report(report: dict[str, Any], mechanism: str, box: str = "teacher") -> tuple[Null, float]:
    """The widest null (`null_families`) and its measured leave-one-out false-positive rate (the worst
    over architectures and over the null with and without the other architectures)."""
    per_arch = report["evidence"]["mechanisms"][mechanism][box]
    tested = [sec["fpr"] for sec in per_arch.values() if sec["fpr"] is not None]
    tested += [s["other_architectures"]["fpr"] for s in per_arch.values() if s.get("other_architectures")]
    tested = [f for f in tested if f is not None]
    if not tested:  # ValueError: the audit trained too few independent students
        raise ValueError("the audit trained no family of 3 independent students, which a test needs")
    return Null.fit(null_families(report, mechanism, box), report["evidence"]["points"]), max(tested)


def evidence_note(report: dict[str, Any]) -> dict[str, str]:
    """What a verification adds from the audit's report: {"evidence": why evidence cannot work for this
    model} when the audit found no challenge that discriminates (`ml.evidence.heldout`: no selected
    challenge, and the fingerprint does not work as verify tests it), and which architectures the null
    does not cover (`ml.evidence.nulls.uncovered`); else nothing."""
    per_arch = (report.get("evidence", {}).get("mechanisms", {}).get("selected") or {}).get("teacher") or {}
    failing = [sec["reason"] for sec in per_arch.values() if not sec.get("works", True)]
    cannot = failing and len(failing) == len(per_arch) and not works(fingerprint_test(report.get("evidence")))
    notes = [failing[0]] if cannot else []
    notes += [n for n in [uncovered(report.get("evidence"), DEFAULT_MECHANISM)] if n]
    return {"evidence": " ".join(notes)} if notes else {}


def predicted_labels(model: nn.Module, ch: Challenge) -> Tensor:
    """A suspect model's labels on the challenge (one batched forward)."""
    return model_logits(model, ch.x).argmax(-1)


def verdict(ch: Challenge, predicted: Tensor, null: Null, measured_fpr: float) -> dict[str, Any]:
    """The suspect's agreement, its p-value against independent models, and the call at ALPHA."""
    agreement = ch.agreement(predicted)
    p = null.p_value(agreement)
    return {
        "agreement": agreement,
        "p_value": p,
        "alpha": ALPHA,
        "verdict": "copy" if p < ALPHA else "not_shown",
        "threshold": null.threshold(),
        "false_positive_bound": ALPHA,
        "measured_false_positive_rate": measured_fpr,
        "null": null.to_json(),
        "null_scope": (
            f"tested against the widest null the audit measured: independent models of {len(null.families)} "
            f"families ({', '.join(null.families)}), the worst p over them; a suspect of another "
            "architecture is judged against all of them, and the bound holds for suspects like them"
        ),
    }
